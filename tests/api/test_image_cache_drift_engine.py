"""vLLM's front end sends a picture's data to its engine core only while it believes the core
lacks it. When the two disagree (a request processed but never sent), the core ends the next
request with that picture with "error" before any token. The real engine, in this process,
on the tiny Qwen2-VL checkpoint: such a request is sent again with its data and answered, n=2
included, and a stream closed before it was read leaves no such disagreement behind."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from PIL import Image

from server.cli import parse_settings
from server.engine.base import GenerationRequest, SamplingOptions

pytestmark = pytest.mark.engine

RESENT = "the engine lacked a picture its front end thought sent"


@pytest.fixture(scope="module")
def engine_loop(tiny_model):
    """(engine, run): the engine and a function running a coroutine on the loop it serves."""
    from server.engine.vllm_engine import VLLMEngine

    model = str(tiny_model("qwen2-vl"))
    settings = parse_settings(["--model", model, "--max-model-len", "1024", "--max-num-seqs", "4"])
    loop = asyncio.new_event_loop()
    engine = VLLMEngine.load(settings, model)
    yield engine, loop.run_until_complete
    loop.run_until_complete(engine.shutdown())
    loop.close()


def request(engine, request_id: str, picture_id: str, n: int = 1) -> GenerationRequest:
    tokenizer = engine.info.tokenizer
    ids = tokenizer.encode("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?"
                           "<|im_end|>\n<|im_start|>assistant\n")
    picture = Image.new("RGB", (112, 112), (200, 30, 30) if picture_id.endswith("1") else (30, 30, 200))
    return GenerationRequest(request_id=request_id, prompt_token_ids=ids, images=[picture], image_ids=[picture_id],
                             sampling=SamplingOptions(max_tokens=3, n=n, temperature=0.8, ignore_eos=True))


async def finish_reasons(engine, req: GenerationRequest) -> dict[int, str]:
    reasons = {}
    async for chunk in await engine.start(req):
        for choice in chunk.choices:
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    return reasons


def test_a_picture_the_engine_lacks_is_resent_for_every_choice(engine_loop, caplog):
    engine, run = engine_loop
    drifted = request(engine, "drift", "picture-1")
    # processed, so vLLM's front end counts the picture as sent; never sent
    prompt = {"prompt_token_ids": drifted.prompt_token_ids, "multi_modal_data": {"image": drifted.images},
              "multi_modal_uuids": {"image": drifted.image_ids}}
    run(engine._llm.renderer.process_for_engine_async(prompt, time.time()))
    with caplog.at_level(logging.WARNING, logger="server.engine.vllm_engine"):
        assert run(finish_reasons(engine, request(engine, "r1", "picture-1", n=2))) == {0: "length", 1: "length"}
    assert sum(RESENT in r.getMessage() for r in caplog.records) == 1


def test_a_stream_closed_unread_leaves_the_picture_unsent(engine_loop, caplog):
    engine, run = engine_loop

    async def closed_unread():
        stream = await engine.start(request(engine, "unread", "picture-2"))
        await stream.aclose()

    run(closed_unread())
    with caplog.at_level(logging.WARNING, logger="server.engine.vllm_engine"):
        assert run(finish_reasons(engine, request(engine, "r2", "picture-2"))) == {0: "length"}
    assert not [r for r in caplog.records if RESENT in r.getMessage()]
