"""What vLLM's input processing costs per request for a picture its processor cache holds,
with the picture handed to it bare (a PIL image: vLLM's EXIF pass copies the pixels) or as
this server hands it (`server.engine.vllm_engine._as_loaded`: as vLLM's own loader does, no
copy). The real engine on the given checkpoint, in this process; nothing is generated.

    python -m clients.bench_handoff --model DIR [--sizes 448x448,1920x1080] [--requests 60]

For each size and way it prints the first (cache miss) call and the median and mean of the
rest (cache hits) of `renderer.process_for_engine_async`, in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from PIL import Image

PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n<|im_start|>assistant\n"


def parse_sizes(text: str) -> list[tuple[int, int]]:
    try:
        sizes = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes are WIDTHxHEIGHT, comma-separated: {text!r}") from None
    if not sizes or any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes are WIDTHxHEIGHT, comma-separated: {text!r}")
    return sizes  # type: ignore[return-value]


async def timings(llm, prompt_ids: list[int], item, uuid: str, requests: int) -> list[float]:
    """Seconds of each call; the first processes the picture, the others find it cached."""
    out = []
    for _ in range(requests):
        prompt = {"prompt_token_ids": prompt_ids, "multi_modal_data": {"image": [item]},
                  "multi_modal_uuids": {"image": [uuid]}}
        start = time.perf_counter()
        await llm.renderer.process_for_engine_async(prompt, time.time())
        out.append(time.perf_counter() - start)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m clients.bench_handoff", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a Qwen2-VL-family checkpoint directory")
    p.add_argument("--sizes", type=parse_sizes, default=parse_sizes("448x448,1920x1080"))
    p.add_argument("--requests", type=int, default=60, help="calls per size and way (the first a miss)")
    args = p.parse_args(argv)
    if args.requests < 2:
        p.error("--requests must be at least 2")

    from server.cli import parse_settings
    from server.engine.vllm_engine import VLLMEngine, _as_loaded

    engine = VLLMEngine.load(parse_settings(["--model", args.model, "--max-model-len", "2048"]), args.model)
    prompt_ids = engine.info.tokenizer.encode(PROMPT)

    async def run() -> None:
        try:
            for width, height in args.sizes:
                picture = Image.linear_gradient("L").resize((width, height)).convert("RGB")
                # (the HF processor's first call at a size is slower: not counted as either way's miss)
                await timings(engine._llm, prompt_ids, picture, f"warm-up-{width}x{height}", 1)
                for way, item in (("bare", picture), ("as ours", _as_loaded(picture))):
                    t = await timings(engine._llm, prompt_ids, item, f"{way}-{width}x{height}", args.requests)
                    hits = t[1:]
                    print(f"{width}x{height} {way:8s} miss {t[0] * 1e3:7.2f} ms   hit median "
                          f"{statistics.median(hits) * 1e3:6.3f} ms, mean {statistics.mean(hits) * 1e3:6.3f} ms",
                          flush=True)
        finally:
            await engine.shutdown()

    asyncio.run(run())


if __name__ == "__main__":  # (vLLM's CPU engine starts its processes by spawning: the guard is needed)
    main()
