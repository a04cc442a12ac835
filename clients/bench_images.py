"""Image ingestion benchmark: fetch + decode throughput at a few sizes, and what the caches
save on repeated images. The loader runs in this process; the images come from
`clients.image_server` (a child process on 127.0.0.2); nothing leaves the machine.

    python clients/bench_images.py [--sizes 640x480,1920x1080,4000x3000] [--count 32]
        [--concurrency 8] [--workers 2] [--max-pixels N] [--family qwen2-vl]

For each size it prints images per second for
  cold     distinct URLs, distinct bytes: fetch + hash + decode (+ resize to the ceiling)
  content  new URLs, bytes already seen: fetch + hash, decode skipped (content cache)
  url      the cold URLs again: fetch and decode skipped (URL cache)
and the speed-up of the two cached paths over the cold one.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import time

import numpy as np
from PIL import Image

from clients.image_server import DEFAULT_HOST as HOST
from clients.image_server import ImageServer
from server.images import ImageLoader
from server.metrics import Metrics
from server.settings import Settings


def photo_like_jpeg(width: int, height: int, variant: int) -> bytes:
    """A JPEG with smooth gradients and mild noise (roughly photo-sized on disk)."""
    rng = np.random.default_rng(variant)
    gradient = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    tint = Image.new("RGB", (width, height), tuple(int(c) for c in rng.integers(0, 256, 3)))
    tile = Image.fromarray(rng.integers(0, 256, size=(128, 128, 3), dtype=np.uint8))
    noise = Image.new("RGB", (width, height))
    for x in range(0, width, 128):
        for y in range(0, height, 128):
            noise.paste(tile, (x, y))
    image = Image.blend(Image.blend(gradient, tint, 0.4), noise, 0.08)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=88)
    return buf.getvalue()


async def timed_load(loader: ImageLoader, urls: list[str], concurrency: int, max_pixels: int | None) -> float:
    """Seconds to load `urls` with at most `concurrency` loads in flight."""
    gate = asyncio.Semaphore(concurrency)

    async def one(url: str) -> None:
        async with gate:
            await loader.load(url, max_pixels=max_pixels)

    started = time.perf_counter()
    await asyncio.gather(*(one(url) for url in urls))
    return time.perf_counter() - started


async def bench_size(args: argparse.Namespace, width: int, height: int) -> dict[str, float]:
    count = args.count
    files = {f"/{i}.jpg": (photo_like_jpeg(width, height, i), "image/jpeg") for i in range(count)}
    settings = Settings(
        image_allow_networks=[f"{HOST}/32"],
        image_max_bytes=64 * 2**20,
        image_max_pixels=args.max_pixels,
        image_decode_workers=args.workers,
        image_fetch_concurrency=args.concurrency,
        image_cache_size=4 * count,
        image_fetch_timeout=60,
    )
    with ImageServer(files) as server:
        loader = ImageLoader(settings, Metrics(), family=args.family, cache_bytes=1 << 40)
        try:
            base = server.base_url
            await timed_load(loader, [f"{base}/{i}.jpg?warmup" for i in range(min(2, count))], 2, None)
            cold_urls = [f"{base}/{i}.jpg?cold" for i in range(count)]
            cold = await timed_load(loader, cold_urls, args.concurrency, None)
            again = [f"{base}/{i}.jpg?again" for i in range(count)]
            content = await timed_load(loader, again, args.concurrency, None)
            url = await timed_load(loader, cold_urls, args.concurrency, None)
        finally:
            await loader.aclose()
    mean_kib = sum(len(body) for body, _ in files.values()) / count / 1024
    return {"cold": count / cold, "content": count / content, "url": count / url, "kib": mean_kib}


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="640x480,1920x1080,4000x3000")
    parser.add_argument("--count", type=int, default=32, help="distinct images per size")
    parser.add_argument("--concurrency", type=int, default=8, help="loads in flight at once")
    parser.add_argument("--workers", type=int, default=2, help="decode threads (--image-decode-workers)")
    parser.add_argument("--max-pixels", type=int, default=None, help="server pixel ceiling (default: model's)")
    parser.add_argument("--family", default="qwen2-vl")
    args = parser.parse_args(argv)

    print(f"family={args.family} count={args.count} concurrency={args.concurrency} workers={args.workers} "
          f"max_pixels={args.max_pixels or 'model default'}")
    print(f"{'size':>11} {'KiB':>7} {'cold img/s':>11} {'content img/s':>14} {'url img/s':>10} "
          f"{'content x':>10} {'url x':>8}")
    for text in args.sizes.split(","):
        width, height = parse_size(text)
        r = asyncio.run(bench_size(args, width, height))
        print(f"{text:>11} {r['kib']:7.0f} {r['cold']:11.1f} {r['content']:14.1f} {r['url']:10.1f} "
              f"{r['content'] / r['cold']:10.1f} {r['url'] / r['cold']:8.0f}")


if __name__ == "__main__":
    main()
