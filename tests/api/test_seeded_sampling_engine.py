"""A `seed` at a temperature above 0 with a prompt prefilled over several engine steps:
vLLM's CPU model runner could not wind the request's generator back and its engine died
(server.engine.seeded_sampling). The real `qwen-vl-serve` process and engine on the tiny
Qwen2-VL, a small step budget so that long prompts are prefilled in chunks, the `openai` SDK."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from support.live_server import ServerProcess

pytestmark = pytest.mark.engine

STEP_TOKENS = 256  # the engine's token budget per step: a longer prompt takes several


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    proc = ServerProcess(
        [
            "--model", str(tiny_model("qwen2-vl")),
            "--served-model-name", "tiny",
            "--max-model-len", "1024",
            "--max-num-seqs", "8",
            "--max-num-batched-tokens", str(STEP_TOKENS),
        ],
        tmp_path_factory.mktemp("logs") / "server-seeded.log",
    ).start()
    yield proc
    proc.stop()


def prompt(i: int) -> str:
    return f"request {i}: " + "tell me more about the picture " * 40


async def ask(client: openai.AsyncOpenAI, i: int, seed: int):
    return await client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": prompt(i)}],
        temperature=1.0, seed=seed, max_tokens=6, extra_body={"ignore_eos": True})


def test_seeded_requests_with_chunked_prompts_are_answered_as_if_unchunked(server):
    """Each prompt is longer than a step, and six at once share steps too: every seeded
    answer must come back, be the one the same request gets alone, and leave the server
    serving."""

    async def run():
        client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
        alone = [await ask(client, i, seed=100 + i) for i in range(6)]
        together = await asyncio.gather(*(ask(client, i, seed=100 + i) for i in range(6)))
        again = await ask(client, 0, seed=100)
        return alone, together, again

    alone, together, again = asyncio.run(run())
    assert all(r.usage.prompt_tokens > STEP_TOKENS for r in alone)
    assert [r.choices[0].message.content for r in together] == [r.choices[0].message.content for r in alone]
    # (and the seed does decide: a different one samples something else)
    assert len({r.choices[0].message.content for r in alone}) > 1
    assert again.choices[0].message.content == alone[0].choices[0].message.content
    assert httpx.get(server.base_url + "/ready", timeout=5).status_code == 200
