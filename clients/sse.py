"""One streaming chat-completions request, timed chunk by chunk.

`stream_chat` never raises for a failed request: every failure becomes a `RequestResult`
with an error kind, so a load run always completes and reports errors by kind:

- `http_<status>`: the server answered with a non-200 status (e.g. `http_429`, `http_503`);
- `timeout`: no complete answer within the client timeout;
- `connect`: the connection could not be made;
- `disconnected`: the connection broke mid-response;
- `stream_error`: the stream carried an error (a chunk with a non-null `error`, or an
  `event: error` event);
- `bad_chunk`: a data line that is not a chat-completion chunk (not JSON, or `choices`,
  `delta`, `content` or `usage` of the wrong type);
- `incomplete`: the stream ended without `data: [DONE]`;
- `no_output`: the stream finished without any text (e.g. only tokens that print
  nothing were generated);
- `bad_usage`: text arrived, but the usage chunk counted no completion tokens;
- `output_length`: a fixed output length was asked for (`expected_tokens`) and the usage
  chunk counted a different number of tokens (the server ignored `min_tokens` or
  `ignore_eos`), or, without a usage chunk, more content chunks came than that many tokens.

A request whose stream carried no usage chunk has its tokens counted as content chunks
(`RequestResult.tokens_from_usage` False), which undercounts when a chunk holds several.
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
        self.event: str | None = None  # the `event:` name of the SSE event being read

    def feed(self, line: str, now: float) -> None:
        """Take one line of the SSE body (comments are ignored; a blank line ends an event)."""
        if not line:
            self.event = None
            return
        if line.startswith("event:"):
            self.event = line[6:].strip()
            return
        if not line.startswith("data:"):
            return
        payload = line[5:].strip()
        if payload == DONE:
            self.done = True
            return
        if self.event == "error":
            self._fail("stream_error")
            return
        try:
            event = json.loads(payload)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than json parses
            self._fail("bad_chunk")
            return
        if not isinstance(event, dict):
            self._fail("bad_chunk")
            return
        if event.get("error") is not None:
            self._fail("stream_error")
            return
        try:
            self._take(event, now)
        except (TypeError, ValueError):
            self._fail("bad_chunk")

    def _fail(self, kind: str) -> None:
        self.error = self.error or kind

    def _take(self, event: dict, now: float) -> None:
        """Read one chunk's usage and content. Raises TypeError or ValueError for a chunk
        whose parts have the wrong types."""
        usage = event.get("usage")
        if usage is not None:
            if not isinstance(usage, dict) or not _count(usage.get("completion_tokens"), optional=True) \
                    or not _count(usage.get("prompt_tokens"), optional=True):
                raise ValueError("malformed usage")
            if usage.get("completion_tokens") is not None:  # `{}` counts nothing: not a usage chunk
                self.usage = usage
        choices = event.get("choices")
        if choices is None:
            return
        if not isinstance(choices, list):
            raise TypeError("choices is not a list")
        for choice in choices:
            if not isinstance(choice, dict):
                raise TypeError("a choice is not an object")
            delta = choice.get("delta")
            if delta is None:
                continue
            if not isinstance(delta, dict):
                raise TypeError("delta is not an object")
            content = delta.get("content")
            if content is not None and not isinstance(content, str):
                raise TypeError("content is not a string")
            if content:
                if self.first is None:
                    self.first = now
                self.last = now
                self.chunks += 1

    def result(self, started: float, finished: float, expected_tokens: int | None = None) -> RequestResult:
        usage = self.usage
        tokens = usage["completion_tokens"] if usage else self.chunks
        error = self.error
        if error is None and not self.done:
            error = "incomplete"
        if error is None and self.first is None:
            error = "no_output"
        if error is None and usage and tokens < 1:
            error = "bad_usage"
        if error is None and usage and expected_tokens is not None and tokens != expected_tokens:
            error = "output_length"
        if error is None and not usage and expected_tokens is not None and tokens > expected_tokens:
            error = "output_length"  # (each content chunk holds a token at least)
        return RequestResult(
            started=started,
            finished=finished,
            first_token=self.first,
            last_token=self.last,
            output_tokens=tokens,
            prompt_tokens=usage.get("prompt_tokens") if usage else None,
            error=error,
            tokens_from_usage=usage is not None,
        )


def _count(value: object, optional: bool = False) -> bool:
    """Whether `value` is a token count (a non-negative int), or None where `optional`."""
    if value is None:
        return optional
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


async def stream_chat(session: aiohttp.ClientSession, url: str, body: bytes,
                      headers: dict[str, str] | None = None,
                      expected_tokens: int | None = None) -> RequestResult:
    """POST `body` (a JSON chat-completions request with `"stream": true`) to `url` and
    time the answer. Token counts come from the usage chunk when the server sends one
    (`stream_options.include_usage`), else from the number of content chunks; with
    `expected_tokens`, a usage count other than that is an `output_length` error (the
    usage sums all choices: with `n` choices, expect n times each one's length). Timeouts
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
    return stream.result(started, time.perf_counter(), expected_tokens)


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
