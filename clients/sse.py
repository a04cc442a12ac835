"""One streaming chat-completions request, timed chunk by chunk.

`stream_chat` never raises for a failed request: every failure becomes a `RequestResult`
with an error kind, so a load run always completes and reports errors by kind:

- `http_<status>`: the server answered with a non-200 status (e.g. `http_429`, `http_503`);
- `timeout`: no complete answer within the client timeout;
- `connect`: the connection could not be made;
- `disconnected`: the connection broke mid-response;
- `stream_error`: the stream carried an error event;
- `bad_chunk`: a data line that is not JSON;
- `incomplete`: the stream ended without `data: [DONE]`;
- `no_output`: the stream finished without any text (e.g. only tokens that print
  nothing were generated).
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError

from clients.stats import RequestResult

DONE = "[DONE]"


class _Stream:
    """Timestamps and counts gathered while reading one SSE body."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.last: float | None = None
        self.chunks = 0
        self.usage: dict | None = None
        self.done = False
        self.error: str | None = None

    def feed(self, line: str, now: float) -> None:
        """Take one line of the SSE body (comments and blank lines are ignored)."""
        if not line.startswith("data:"):
            return
        payload = line[5:].strip()
        if payload == DONE:
            self.done = True
            return
        try:
            event = json.loads(payload)
        except ValueError:
            self.error = self.error or "bad_chunk"
            return
        if not isinstance(event, dict):
            self.error = self.error or "bad_chunk"
            return
        if "error" in event:
            self.error = self.error or "stream_error"
            return
        if event.get("usage"):
            self.usage = event["usage"]
        for choice in event.get("choices") or ():
            if (choice.get("delta") or {}).get("content"):
                if self.first is None:
                    self.first = now
                self.last = now
                self.chunks += 1

    def result(self, started: float, finished: float) -> RequestResult:
        usage = self.usage or {}
        tokens = usage.get("completion_tokens", self.chunks)
        error = self.error
        if error is None and not self.done:
            error = "incomplete"
        if error is None and self.first is None:
            error = "no_output"
        return RequestResult(
            started=started,
            finished=finished,
            first_token=self.first,
            last_token=self.last,
            output_tokens=int(tokens),
            prompt_tokens=usage.get("prompt_tokens"),
            error=error,
        )


async def stream_chat(session: aiohttp.ClientSession, url: str, body: bytes,
                      headers: dict[str, str] | None = None) -> RequestResult:
    """POST `body` (a JSON chat-completions request with `"stream": true`) to `url` and
    time the answer. Token counts come from the usage chunk when the server sends one
    (`stream_options.include_usage`), else from the number of content chunks. Timeouts
    are the session's (`aiohttp.ClientTimeout`)."""
    hdrs = {"content-type": "application/json", "accept": "text/event-stream", **(headers or {})}
    started = time.perf_counter()
    stream = _Stream()
    try:
        async with session.post(url, data=body, headers=hdrs) as response:
            if response.status != 200:
                await response.read()
                return RequestResult(started, time.perf_counter(), error=f"http_{response.status}")
            async for raw in response.content:
                stream.feed(raw.decode("utf-8", "replace").rstrip("\r\n"), time.perf_counter())
    except asyncio.TimeoutError:  # aiohttp's own timeouts subclass it
        return RequestResult(started, time.perf_counter(), error="timeout")
    except aiohttp.ClientConnectorError:
        return RequestResult(started, time.perf_counter(), error="connect")
    except aiohttp.ClientError:
        # ServerDisconnectedError, ClientPayloadError (a broken chunked body), resets.
        return RequestResult(started, time.perf_counter(), error="disconnected")
    except (HttpProcessingError, ValueError):  # e.g. a line longer than the read buffer allows
        return RequestResult(started, time.perf_counter(), error="bad_chunk")
    return stream.result(started, time.perf_counter())


def open_session(max_connections: int | None, timeout: float, connect_timeout: float) -> aiohttp.ClientSession:
    """The client session a load run sends through: at most `max_connections` connections
    (None: no limit), kept alive between requests; `timeout` seconds per request and
    `connect_timeout` to connect; no proxies from the environment.

    aiohttp rather than httpx: on the 2-core machine, with 64 streams in flight, an httpx
    `AsyncClient` held only 11-14 connections open at a time and delivered 24-33 req/s
    while the server answered its own probe requests in 13-75 ms; aiohttp on the same
    server and workload delivered 141 req/s (docs/benchmarks.md)."""
    connector = aiohttp.TCPConnector(limit=max_connections or 0, limit_per_host=0)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout, connect=connect_timeout),
        read_bufsize=1 << 20,
        trust_env=False,
    )
