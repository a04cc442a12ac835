"""How decoded pictures reach vLLM. Ours are RGB, upright and without metadata already, so
they go in as vLLM's own loader hands its images on: a picture vLLM's processor cache holds
is not copied for vLLM's EXIF pass on every request, and the model sees the same pixels as
when it is handed a bare image to normalise itself. The real engine, in this process, on the tiny
Qwen2-VL checkpoint."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from PIL import Image

from server.cli import parse_settings
from server.engine.base import GenerationRequest, SamplingOptions

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def engine_loop(tiny_model):
    """(engine, run): the engine and a function running a coroutine on the loop it serves."""
    from server.engine.vllm_engine import VLLMEngine

    model = str(tiny_model("qwen2-vl"))
    settings = parse_settings(["--model", model, "--max-model-len", "1024", "--max-num-seqs", "4", "--seed", "0"])
    loop = asyncio.new_event_loop()
    engine = VLLMEngine.load(settings, model)
    yield engine, loop.run_until_complete
    loop.run_until_complete(engine.shutdown())
    loop.close()


def picture(seed: int, size: tuple[int, int] = (224, 168)) -> Image.Image:
    """A picture the model tells apart from others: a gradient and a coloured block."""
    im = Image.linear_gradient("L").resize(size).convert("RGB")
    im.paste((seed * 70 % 256, 255 - seed * 40 % 256, seed * 15 % 256), (8 * seed, 10, 8 * seed + 60, 70))
    return im


def request(engine, request_id: str, image: Image.Image, image_id: str | None) -> GenerationRequest:
    ids = engine.info.tokenizer.encode("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?"
                                       "<|im_end|>\n<|im_start|>assistant\n")
    return GenerationRequest(request_id=request_id, prompt_token_ids=ids, images=[image],
                             image_ids=[image_id] if image_id else [],
                             sampling=SamplingOptions(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=5))


async def answer(engine, req: GenerationRequest) -> list[tuple]:
    """Each token with its log-probability and those of the 5 likeliest: random weights
    answer many pictures with the same tokens, but not with the same numbers."""
    tokens: list[tuple] = []
    async for chunk in await engine.start(req):
        for choice in chunk.choices:
            tokens += [(lp.token, lp.logprob, tuple(lp.top)) for lp in choice.logprobs or ()]
    return tokens


@contextlib.contextmanager
def copies_of(size: tuple[int, int]):
    """Counts the full copies Pillow makes of images of `size`, in any thread."""
    made: list[int] = []
    original = Image.Image.copy

    def counting(self):
        if self.size == size:
            made.append(1)
        return original(self)

    Image.Image.copy = counting
    try:
        yield made
    finally:
        Image.Image.copy = original


def test_a_cached_picture_is_not_copied(engine_loop):
    """On a miss vLLM copies the items its HF processor is to run on, once (as it does for
    its own loader's images), before the processor's own resizing; a bare image was copied
    twice. On a hit nothing: a bare image was copied on every request."""
    engine, run = engine_loop
    image = picture(1)
    with copies_of(image.size) as on_miss:
        first = run(answer(engine, request(engine, "miss", image, "handoff-1")))
    with copies_of(image.size) as on_hit:
        again = run(answer(engine, request(engine, "hit", image, "handoff-1")))
    assert len(first) == 8 and again == first
    assert len(on_miss) <= 1
    assert on_hit == []


def test_the_model_sees_the_same_pixels_as_vllms_own_normalising(engine_loop):
    """Handed bare and without an id, vLLM normalises the picture itself and hashes its
    pixels: the answer must not differ. A different picture does change it (the check can
    fail)."""
    engine, run = engine_loop
    ours = run(answer(engine, request(engine, "ours", picture(2), "handoff-2")))
    bare = run(answer(engine, request(engine, "bare", picture(2), None)))
    other = run(answer(engine, request(engine, "other", picture(3), "handoff-3")))
    assert ours == bare
    assert other != ours


def test_a_picture_vllm_must_still_convert_is_handed_bare(engine_loop):
    """Not RGB, or with metadata vLLM acts on: handed as it is, converted by vLLM, answered as
    its RGB twin is (the engine contract takes any PIL image, not only our decoder's)."""
    engine, run = engine_loop
    grey = picture(4).convert("L")
    rgb_twin = grey.convert("RGB")
    with copies_of(grey.size) as made:
        converted = run(answer(engine, request(engine, "grey", grey, "handoff-4-grey")))
    assert made, "vLLM's EXIF pass copies a bare picture"
    assert converted == run(answer(engine, request(engine, "twin", rgb_twin, "handoff-4-rgb")))


def test_the_handoff_benchmark_times_the_real_engine(engine_loop):
    """`clients.bench_handoff`'s timing: one call a miss, the rest hits, each timed."""
    from clients.bench_handoff import PROMPT, timings
    from server.engine.vllm_engine import _as_loaded

    engine, run = engine_loop
    ids = engine.info.tokenizer.encode(PROMPT)
    seconds = run(timings(engine._llm, ids, _as_loaded(picture(5)), "handoff-bench", 3))
    assert len(seconds) == 3 and all(0 < s < 30 for s in seconds)
