"""Soak test: many concurrent streaming clients with images against a running server, a
share of them hanging up mid-stream, bursts beyond the queue limit.

Loopback only and bounded: it stops after `--requests` requests (not counting a short
warm-up and the bursts' requests) or `--max-seconds`, whichever comes first. It prints one JSON object; the exit status is 1 when a promise was
broken (a 5xx, an invalid response, a refusal that is not 429, an engine still busy at the
end, or memory growth beyond `--max-rss-growth-mb`).

    python -m clients.soak --url http://127.0.0.1:8000 --clients 200 --requests 3000 --pid PID
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
import httpx

from clients.sse import open_session
from server.help_format import DefaultsHelpFormatter


def _images(count: int, seed: int) -> list[str]:
    from PIL import Image

    rng = random.Random(seed)
    urls = []
    for i in range(count):
        img = Image.new("RGB", (rng.randint(32, 160), rng.randint(32, 160)),
                        (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


@dataclass
class SoakResult:
    outcomes: Counter = field(default_factory=Counter)
    invalid: list[str] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    max_loop_lag: float = 0.0


async def _watch_loop_lag(result: SoakResult, period: float = 0.05) -> None:
    """Records how late this client's own event loop wakes up. A transport error (say a
    connect timeout) while the lag was as long as the timeout is the client's stall, not
    the server's: the report shows both so the two can be told apart."""
    while True:
        before = time.monotonic()
        await asyncio.sleep(period)
        result.max_loop_lag = max(result.max_loop_lag, time.monotonic() - before - period)


async def _one(session: aiohttp.ClientSession, url: str, model: str, image: str | None, hang_up: bool,
               max_tokens: int, result: SoakResult) -> int | None:
    """One streaming request, its outcome counted in `result`; returns the HTTP status (None
    when the connection failed)."""
    content: list | str = "Describe the picture briefly."
    if image is not None:
        content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "Describe it."}]
    body = {"model": model, "messages": [{"role": "user", "content": content}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0.7, "stream_options": {"include_usage": True}}
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as r:
            result.statuses[r.status] += 1
            if r.status != 200:
                text = await r.text(errors="replace")
                result.outcomes["refused" if r.status == 429 else f"http_{r.status}"] += 1
                if r.status != 429:
                    result.invalid.append(f"status {r.status}: {text[:200]}")
                return r.status
            events = []
            async for raw in r.content:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if hang_up and len(events) >= 2:
                    # Leaving with the body unread closes the connection: the server sees
                    # the client go away mid-stream.
                    result.outcomes["hung_up"] += 1
                    return r.status
            problem = _validate(events)
            if problem:
                result.invalid.append(problem)
                result.outcomes["invalid"] += 1
            else:
                result.outcomes["completed"] += 1
            return r.status
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        result.outcomes["transport_error"] += 1
        result.invalid.append(f"transport error: {type(exc).__name__}")
        return None


def _validate(events: list[str]) -> str | None:
    """A completed stream: JSON chunks, a finish_reason, a usage chunk, then exactly [DONE]."""
    if not events or events[-1] != "[DONE]" or events.count("[DONE]") != 1:
        return "stream did not end with a single [DONE]"
    finish = usage = None
    for raw in events[:-1]:
        chunk = json.loads(raw)
        if "error" in chunk:
            return f"error event: {chunk['error'].get('code')}"
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices", []):
            finish = choice.get("finish_reason") or finish
    if finish not in ("stop", "length"):
        return f"bad finish_reason {finish!r}"
    if not usage or usage["total_tokens"] != usage["prompt_tokens"] + usage["completion_tokens"]:
        return "missing or inconsistent usage"
    return None


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def _rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.memory_info().rss / 2**20
    except psutil.Error:
        return None


async def run_soak(url: str, *, model: str, clients: int, requests: int, hang_up_share: float,
                   burst_every: int, burst_size: int, images: int, max_tokens: int,
                   max_seconds: float, pid: int | None, seed: int = 0) -> dict:
    rng = random.Random(seed)
    pool = _images(images, seed)
    result = SoakResult()
    started = time.monotonic()
    # aiohttp, as the benchmark's load generator: an httpx client kept far fewer connections
    # open than it had requests in flight (docs/benchmarks.md), which would soak far fewer
    # concurrent streams than `clients` says.
    async with open_session(None, timeout=120, connect_timeout=10) as client:
        # Warm-up, then the memory baseline (caches and allocator arenas settle first).
        await asyncio.gather(*(_one(client, url, model, pool[i % len(pool)], False, max_tokens, result)
                               for i in range(min(32, requests))))
        rss_start = _rss_mb(pid)
        lag_watch = asyncio.create_task(_watch_loop_lag(result))
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(requests):
            queue.put_nowait(i)

        async def worker() -> None:
            while time.monotonic() - started < max_seconds:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                image = pool[rng.randrange(len(pool))] if rng.random() < 0.8 else None
                status = await _one(client, url, model, image, rng.random() < hang_up_share, max_tokens, result)
                if status == 429:
                    # Back off as a real client does (the SDKs retry after a pause): without
                    # it, refusals come back in a millisecond and the client burns through its
                    # request budget while the server is full.
                    await asyncio.sleep(rng.uniform(0.05, 0.25))
                if burst_every and i % burst_every == 0:
                    # A burst far beyond the queue: the excess must be refused with 429 at once.
                    await asyncio.gather(*(_one(client, url, model, None, False, max_tokens, result)
                                           for _ in range(burst_size)))

        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.monotonic() - started
        lag_watch.cancel()
        # The engine must be idle once the clients are gone (aborted work included).
        idle = False
        for _ in range(100):
            async with client.get(url + "/metrics") as r:
                text = await r.text()
            if _metric(text, "qwenvl_engine_unfinished_requests") == 0 and _metric(text, "qwenvl_admission_inflight_requests") == 0:
                idle = True
                break
            await asyncio.sleep(0.2)
        rss_end = _rss_mb(pid)
    return {
        "requests_sent": sum(result.statuses.values()),
        "seconds": round(elapsed, 1),
        "outcomes": dict(result.outcomes),
        "statuses": {str(k): v for k, v in sorted(result.statuses.items())},
        "server_errors": sum(v for k, v in result.statuses.items() if k >= 500),
        "invalid": result.invalid[:20],
        "client_max_loop_lag_s": round(result.max_loop_lag, 2),
        "engine_idle_at_end": idle,
        "rss_mb_start": rss_start and round(rss_start, 1),
        "rss_mb_end": rss_end and round(rss_end, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clients.soak", description=__doc__,
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server root (loopback only)")
    p.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    p.add_argument("--clients", type=int, default=200, help="streams in flight at once")
    p.add_argument("--requests", type=int, default=3000,
                   help="requests, besides the warm-up's and the bursts'")
    p.add_argument("--hang-up-share", type=float, default=0.2, help="share of clients that hang up mid-stream")
    p.add_argument("--burst-every", type=int, default=250, help="a burst after every N-th request (0: none)")
    p.add_argument("--burst-size", type=int, default=300, help="requests sent at once in a burst")
    p.add_argument("--images", type=int, default=50, help="distinct images in the pool")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per answer")
    p.add_argument("--max-seconds", type=float, default=900, help="stop issuing after this many seconds")
    p.add_argument("--pid", type=int, default=None, help="server process id, for the memory figures")
    p.add_argument("--max-rss-growth-mb", type=float, default=200,
                   help="server memory growth (MB) that fails the run")
    args = p.parse_args(argv)
    if not re.match(r"^https?://(127\.\d+\.\d+\.\d+|localhost|\[::1\])(:\d+)?$", args.url):
        p.error("the soak test only targets loopback addresses")
    model = args.model or httpx.get(args.url + "/v1/models").json()["data"][0]["id"]
    report = asyncio.run(run_soak(
        args.url, model=model, clients=args.clients, requests=args.requests, hang_up_share=args.hang_up_share,
        burst_every=args.burst_every, burst_size=args.burst_size, images=args.images,
        max_tokens=args.max_tokens, max_seconds=args.max_seconds, pid=args.pid))
    growth = (report["rss_mb_end"] or 0) - (report["rss_mb_start"] or 0)
    report["rss_growth_mb"] = round(growth, 1)
    ok = (report["server_errors"] == 0 and not report["invalid"] and report["engine_idle_at_end"]
          and growth <= args.max_rss_growth_mb)
    report["ok"] = ok
    print(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
