"""The plugin on a real vLLM engine (AsyncLLM, CPU, float32) against the PyTorch reference.

One engine serves the whole module. The checkpoint directory carries the published remote-code
files booby-trapped, so any import of them fails the `no_remote_code` check.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch

from server.qwen_vl.tokenizer import (
    CHAT_STOP_TOKEN_IDS,
    ENDOFTEXT_ID,
    IM_END_ID,
    IM_START_ID,
    IMG_END_ID,
    IMG_PAD_ID,
    IMG_START_ID,
)
from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

from .engine_helpers import ForceTokens, run_vision_tower
from .reference import ReferenceQwenVL, expand_image_pairs, load_checkpoint, preprocess

pytestmark = pytest.mark.engine

# Float32 on both sides; differences come from kernel order only.
LOGPROB_TOLERANCE = 2e-3
VISION_TOLERANCE = 2e-3
GREEDY_TOKENS = 12
REPORT: dict[str, float] = {}


@pytest.fixture(scope="module")
def engine(tiny_dir: Path, engine_runner_factory):
    runner = engine_runner_factory(
        model=str(tiny_dir),
        dtype="float32",
        enforce_eager=True,
        max_num_seqs=4,
        limit_mm_per_prompt={"image": 3},
        logits_processors=[ForceTokens],
        enable_mm_embeds=True,
        seed=0,
        # The worker runs inside the engine-core process: one process start less.
        distributed_executor_backend="uni",
    )
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def tokenizer(engine):
    return engine.engine.get_tokenizer()


@pytest.fixture(scope="module")
def reference(tiny_dir: Path) -> ReferenceQwenVL:
    return ReferenceQwenVL(*load_checkpoint(tiny_dir))


@pytest.fixture(scope="module", autouse=True)
def report_differences(tmp_path_factory):
    yield
    if REPORT:
        text = json.dumps(REPORT, indent=2, sort_keys=True)
        print("\nQwen-VL engine vs reference, largest differences:\n" + text)
        (tmp_path_factory.getbasetemp() / "qwen_vl_reference_diffs.json").write_text(text)


def chat_prompt_ids(tokenizer, num_images: int, question: str) -> list[int]:
    """Token ids of a one-turn chat with `num_images` images, as the lead's server builds them."""
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer.encode(text, add_special_tokens=False)


def greedy(max_tokens: int = GREEDY_TOKENS, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def with_images(prompt_ids: list[int], images) -> dict:
    """A token-id prompt as the lead's server submits it."""
    prompt: dict = {"prompt_token_ids": prompt_ids}
    if len(images):
        prompt["multi_modal_data"] = {"image": images}
    return prompt


def actual_token_logprobs(out) -> torch.Tensor:
    """The engine's logprob of each prompt token after the first."""
    pairs = zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:])
    return torch.tensor([entry[token].logprob for entry, token in pairs])


def test_engine_uses_plugin_tokenizer_and_no_remote_code(
    engine, tokenizer, remote_code_marker: Path
) -> None:
    assert "QWenTokenizer" in type(tokenizer).__name__
    assert "Picture" in tokenizer.chat_template
    assert tokenizer.eos_token_id == IM_END_ID
    assert not remote_code_marker.exists(), remote_code_marker.read_text()


def test_vision_tower_matches_reference(engine, reference, images) -> None:
    pixels = torch.stack([preprocess(image) for image in images])

    ours = engine.apply_model(partial(run_vision_tower, pixels=pixels))
    expected = reference.vision(pixels)
    assert ours.shape == expected.shape == (3, 256, 256)
    diff = (ours - expected).abs().max().item()
    REPORT["vision_tower_max_abs_diff"] = diff
    REPORT["vision_tower_max_abs_value"] = expected.abs().max().item()
    assert diff < VISION_TOLERANCE * max(1.0, expected.abs().max().item())
    # The images are distinct, so must be their embeddings (no batch mix-up).
    assert (ours[0] - ours[1]).abs().max() > 100 * diff


@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_prompt_logprobs_and_greedy_match_reference(
    engine, tokenizer, reference, images, num_images: int
) -> None:
    prompt_ids = chat_prompt_ids(tokenizer, num_images, "Describe the pictures, 请详细描述。")
    assert prompt_ids.count(IMG_START_ID) == num_images
    used = images[:num_images]
    out, _ = engine.generate(with_images(prompt_ids, used), greedy(prompt_logprobs=1))

    expanded = expand_image_pairs(prompt_ids)
    assert out.prompt_token_ids == expanded
    assert expanded.count(IMG_PAD_ID) == 256 * num_images

    embeds = reference.vision(torch.stack([preprocess(i) for i in used])) if used else None
    expected = reference.prompt_logprobs(expanded, embeds)
    ours = actual_token_logprobs(out)
    diff = (ours - expected).abs().max().item()
    REPORT[f"prompt_logprob_max_abs_diff_{num_images}_images"] = diff
    assert diff < LOGPROB_TOLERANCE

    generated = list(out.outputs[0].token_ids)
    assert generated == reference.greedy(expanded, embeds, GREEDY_TOKENS)

    if num_images:
        # The comparison is sensitive to the image: another image moves the logprobs far more
        # than the engine/reference difference.
        other_images = images[2:3] + used[1:]
        other, _ = engine.generate(with_images(prompt_ids, other_images), greedy(prompt_logprobs=1))
        assert (actual_token_logprobs(other) - ours).abs().max().item() > 100 * max(diff, 1e-5)


def test_text_prompt_and_expanded_prompt_match_token_prompt(engine, tokenizer, images) -> None:
    content = [{"type": "image"}, {"type": "text", "text": "What is this?"}]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer.encode(text, add_special_tokens=False)
    mm = {"image": images[:1]}
    by_ids, _ = engine.generate({"prompt_token_ids": ids, "multi_modal_data": mm}, greedy())
    by_text, _ = engine.generate({"prompt": text, "multi_modal_data": mm}, greedy())
    expanded = expand_image_pairs(ids)
    pre_expanded, _ = engine.generate(
        {"prompt_token_ids": expanded, "multi_modal_data": mm}, greedy()
    )
    for out in (by_text, pre_expanded):
        assert out.prompt_token_ids == by_ids.prompt_token_ids == expanded
        assert out.outputs[0].token_ids == by_ids.outputs[0].token_ids


def test_precomputed_image_embeddings_match_pixels(engine, tokenizer, reference, images) -> None:
    ids = chat_prompt_ids(tokenizer, 2, "Compare.")
    pixels_out, _ = engine.generate(with_images(ids, images[:2]), greedy(prompt_logprobs=1))
    embeds = reference.vision(torch.stack([preprocess(i) for i in images[:2]]))
    embeds_out, _ = engine.generate(with_images(ids, embeds), greedy(prompt_logprobs=1))
    assert embeds_out.prompt_token_ids == pixels_out.prompt_token_ids
    assert embeds_out.outputs[0].token_ids == pixels_out.outputs[0].token_ids
    diff = actual_token_logprobs(pixels_out) - actual_token_logprobs(embeds_out)
    assert diff.abs().max().item() < LOGPROB_TOLERANCE


def test_special_looking_user_text_stays_text(engine, tokenizer, images) -> None:
    """User text `<img></img>` encoded as plain text is neither an image slot nor a special."""
    user_text = "Explain <img></img> and <|im_start|> tags"
    plain = tokenizer.encode(user_text, add_special_tokens=False, split_special_tokens=True)
    assert max(plain) < ENDOFTEXT_ID
    head = tokenizer.encode(
        "<|im_start|>user\nPicture 1: <img></img>\n", add_special_tokens=False
    )
    tail = tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    ids = head + plain + tail
    out, _ = engine.generate(with_images(ids, images[:1]), greedy())
    assert out.prompt_token_ids == expand_image_pairs(head) + plain + tail


def test_image_count_mismatch_is_rejected(engine, tokenizer, images) -> None:
    ids = chat_prompt_ids(tokenizer, 1, "Two images but one slot")
    with pytest.raises(Exception) as excinfo:
        engine.generate(with_images(ids, images[:2]), greedy())
    assert "1 image slot(s)" in exception_chain_text(excinfo.value)
    assert "2 image(s) were given" in exception_chain_text(excinfo.value)


def exception_chain_text(exc: BaseException | None) -> str:
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return " | ".join(parts)


STREAM_TEXT = "你好，世界！视觉语言模型 Qwen-VL 🦙🐈‍⬛ 龘靐齉 — ok"


def test_streaming_multibyte_text_has_no_replacement_chars(engine, tokenizer) -> None:
    ids = tokenizer.encode(STREAM_TEXT, add_special_tokens=False)
    # The text must contain characters split across tokens, or the test proves nothing.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    params = SamplingParams(
        temperature=0.0,
        max_tokens=len(ids),
        ignore_eos=True,
        output_kind=RequestOutputKind.DELTA,
        extra_args={"force_token_ids": ids},
    )
    prompt_ids = chat_prompt_ids(tokenizer, 0, "Say hello")
    final, stream = engine.generate({"prompt_token_ids": prompt_ids}, params)
    deltas = [o.outputs[0].text for o in stream]
    assert all("\ufffd" not in d for d in deltas), deltas
    assert "".join(deltas) == STREAM_TEXT
    assert sum(len(o.outputs[0].token_ids) for o in stream) == len(ids)


def test_grounding_tags_survive_skip_special_tokens_and_im_end_stops(engine, tokenizer) -> None:
    answer = "<ref>the cat</ref><box>(12,34),(567,890)</box>"
    ids = tokenizer.encode(answer, add_special_tokens=False) + [IM_END_ID, 198, 872]
    params = SamplingParams(
        temperature=0.0,
        max_tokens=len(ids) + 5,
        skip_special_tokens=True,
        extra_args={"force_token_ids": ids},
    )
    out, _ = engine.generate({"prompt_token_ids": chat_prompt_ids(tokenizer, 0, "Where?")}, params)
    completion = out.outputs[0]
    assert completion.text == answer
    assert completion.finish_reason == "stop"
    assert list(completion.token_ids) == ids[: ids.index(IM_END_ID) + 1]


@pytest.mark.parametrize("stop_id", [IM_START_ID, ENDOFTEXT_ID])
def test_chat_stop_token_ids_end_generation(engine, tokenizer, stop_id: int) -> None:
    body = tokenizer.encode("Hello there", add_special_tokens=False)
    ids = body + [stop_id, 9707]
    params = SamplingParams(
        temperature=0.0,
        max_tokens=len(ids) + 5,
        stop_token_ids=list(CHAT_STOP_TOKEN_IDS),
        extra_args={"force_token_ids": ids},
    )
    out, _ = engine.generate({"prompt_token_ids": chat_prompt_ids(tokenizer, 0, "Hi")}, params)
    assert out.outputs[0].text == "Hello there"
    assert out.outputs[0].finish_reason == "stop"


def test_engine_context_length_is_seq_length(engine) -> None:
    assert engine.engine.model_config.max_model_len == 2048


def test_image_tokens_are_not_left_in_output(tokenizer) -> None:
    ids = [IMG_START_ID, IMG_PAD_ID, IMG_END_ID] + tokenizer.encode("x", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "x"
