"""The filter that removes special tokens other than grounding tags from generated text
(server/chat/specials.py): a stream's pieces, joined, are what the whole text gives."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.chat.specials import SpecialTokenFilter

FRAGMENTS = ["<|im_", "end|>", "<|im_end|>", "<|vision_start|>", "<|box_start|>", "(1,2)", "<|", "|>",
             "<|box_end|>", "a", " ", "<", "|", "<|endoftext|>", "vision_", "start|>"]


@pytest.fixture(scope="module")
def specials(tiny_tokenizer):
    f = SpecialTokenFilter(tiny_tokenizer)
    assert f.active
    return f


def streamed(specials, pieces):
    cleaner = specials.pieces()
    return "".join(cleaner.feed(p) for p in pieces) + cleaner.flush()


def test_grounding_tags_stay_and_other_specials_go(specials):
    text = "<|object_ref_start|>dog<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|><|im_end|>"
    assert specials(text) == text.removesuffix("<|im_end|>")
    assert streamed(specials, list(text)) == specials(text)  # one character at a time


def test_text_around_a_removed_token_does_not_join_into_another(specials):
    pieces = ["<|im_", "<|vision_start|>", "end|>"]
    assert specials("".join(pieces)) == "<|im_end|>"
    assert streamed(specials, pieces) == "<|im_end|>"


def test_an_unfinished_token_at_the_end_is_text(specials):
    assert streamed(specials, ["ok <|im_", "en"]) == "ok <|im_en"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=12), st.data())
def test_any_split_gives_the_whole_texts_answer(specials, parts, data):
    text = "".join(parts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=6)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    assert streamed(specials, pieces) == specials(text)


def test_marking_the_grounding_tags_ordinary_keeps_them_when_skipping_specials(tiny_model):
    """What the engine does to its tokenizer at load: then vLLM's detokenizer, skipping
    special tokens, writes the text the client gets (and matches stop strings against it)."""
    from tokenizers.decoders import DecodeStream
    from transformers import AutoTokenizer

    from server.chat.specials import keep_grounding_tags_when_skipping

    tokenizer = AutoTokenizer.from_pretrained(tiny_model("qwen2-vl"))  # (not the shared one)
    text = "a<|object_ref_start|>dog<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>b<|video_pad|>c<|im_end|>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert SpecialTokenFilter(tokenizer).active

    assert keep_grounding_tags_when_skipping(tokenizer)
    assert not keep_grounding_tags_when_skipping(tokenizer)  # nothing left to change
    assert tokenizer.encode(text, add_special_tokens=False) == ids  # encoding unchanged
    stream = DecodeStream(skip_special_tokens=True)  # as vLLM's FastIncrementalDetokenizer
    decoded = "".join(stream.step(tokenizer._tokenizer, i) or "" for i in ids)
    assert decoded == "a<|object_ref_start|>dog<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>bc"
    assert not SpecialTokenFilter(tokenizer).active  # the engine's decoding is enough now
