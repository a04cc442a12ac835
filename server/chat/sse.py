"""Server-Sent Events framing."""

from __future__ import annotations

import json
import re
from typing import Any

# Characters that JSON leaves raw but that Python's str.splitlines (hence httpx's
# iter_lines, and SSE readers built on it) takes for line breaks, splitting a data line;
# json.dumps already escapes the control characters it would also split on.
_LINE_BREAKS = re.compile("[\x85\u2028\u2029]")


def _escaped(match: re.Match) -> str:
    return f"\\u{ord(match.group()):04x}"


def sse_event(payload: dict[str, Any]) -> str:
    # ensure_ascii=False keeps Chinese readable on the wire; JSON stays valid UTF-8.
    data = json.dumps(payload, ensure_ascii=False, separators=(',', ':'))
    if _LINE_BREAKS.search(data):
        data = _LINE_BREAKS.sub(_escaped, data)
    return f"data: {data}\n\n"


def sse_done() -> str:
    return "data: [DONE]\n\n"


def sse_comment(text: str = "keep-alive") -> str:
    """A comment line: clients ignore it, proxies see traffic and keep the stream open."""
    return f": {text}\n\n"


async def with_keepalive(events, interval: float, deadline: float | None = None, stop=None, stop_error=None):
    """Re-yield `events`, adding an SSE comment whenever nothing was sent for `interval`
    seconds (the engine's own queue, a long prefill) so that proxies do not close an idle
    stream. (A request waiting for an admission slot has no response yet, and so nothing to
    add comments to: its wait is bounded by --request-timeout, as vLLM's own server sends
    nothing before a request's first token either.)

    `deadline` (a `time.perf_counter()` value) raises `TimeoutError` when passed; setting
    the `stop` event (an `asyncio.Event`) raises `stop_error()` (by default a
    `ServiceUnavailableError` saying the server shut down). Closing
    this generator (a client disconnect) closes `events` too, which aborts the engine
    request behind it.
    """
    import asyncio
    import time

    from server.errors import ServiceUnavailableError

    iterator = events.__aiter__()
    pending: asyncio.Future | None = None
    stopper = asyncio.ensure_future(stop.wait()) if stop is not None else None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(iterator.__anext__())
            timeout = interval
            if deadline is not None:
                timeout = min(interval, deadline - time.perf_counter())
                if timeout <= 0:
                    raise TimeoutError
            # (a wait cut short by the deadline sends no comment: the loop's timers may wake
            # it a moment early, and a comment then would begin a response about to fail)
            for_comment = timeout == interval
            waiting = {pending} if stopper is None else {pending, stopper}
            done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if stopper is not None and stopper in done:
                if stop_error is not None:
                    raise stop_error()
                raise ServiceUnavailableError("The server shut down before the response was complete.")
            if not done:
                if for_comment:
                    yield sse_comment()
                continue
            task, pending = pending, None
            try:
                item = task.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if stopper is not None:
            stopper.cancel()
        if pending is not None:
            pending.cancel()
            try:
                await pending
            except BaseException:
                pass
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()
