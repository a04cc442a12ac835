"""Server-Sent Events framing."""

from __future__ import annotations

import asyncio
import json
import re
import time
from json.encoder import encode_basestring
from typing import Any

# Characters that JSON leaves raw but that Python's str.splitlines (hence httpx's
# iter_lines, and SSE readers built on it) takes for line breaks, splitting a data line;
# json.dumps already escapes the control characters it would also split on.
_LINE_BREAKS = re.compile("[\x85\u2028\u2029]")


def _escaped(match: re.Match) -> str:
    return f"\\u{ord(match.group()):04x}"


def json_string(text: str) -> str:
    """`text` as a JSON string, as `sse_event` writes strings (UTF-8 kept, the line breaks
    above escaped)."""
    data = encode_basestring(text)
    if _LINE_BREAKS.search(data):
        data = _LINE_BREAKS.sub(_escaped, data)
    return data


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
    request behind it. `events` is read one item at a time, as this generator is asked for
    one: nothing is read ahead.
    """
    from server.errors import ServiceUnavailableError

    loop = asyncio.get_running_loop()
    reads = _Reads(events.__aiter__())
    stopper = None
    if stop is not None:
        stopper = asyncio.ensure_future(stop.wait())
        stopper.add_done_callback(reads.stop)
    try:
        while True:
            reads.ask(loop)
            while True:
                timeout = interval
                if deadline is not None:
                    timeout = min(interval, deadline - time.perf_counter())
                    if timeout <= 0:
                        raise TimeoutError
                if reads.stopped or reads.outcome is not None:
                    break
                # (a wait cut short by the deadline sends no comment: the loop's timers may
                # wake it a moment early, and a comment then would begin a response about to
                # fail)
                for_comment = timeout == interval
                timer = loop.call_later(timeout, reads.wake_up)
                try:
                    await reads.woken
                finally:
                    timer.cancel()
                if reads.stopped or reads.outcome is not None:
                    break
                reads.woken = loop.create_future()
                if for_comment:
                    yield sse_comment()
            if reads.stopped:
                if stop_error is not None:
                    raise stop_error()
                raise ServiceUnavailableError("The server shut down before the response was complete.")
            item, error = reads.outcome
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
    finally:
        if stopper is not None:
            stopper.remove_done_callback(reads.stop)
            stopper.cancel()
        await reads.close()


_END = object()  # the outcome of a read that found the events over


class _Reads:
    """`with_keepalive`'s reads of its events: all in one task, resumed for each read by a
    future, rather than a task and an `asyncio.wait` per item (which cost 10-13 us an item,
    and at 64 streams the loop's thread is the limit).

    `outcome` is None while a read goes on, then (item or `_END`, None) or (None, the
    exception it raised). `woken` is the future the consumer waits on: the read's end, its
    timer (`wake_up`) and a stop (`stopped` is then True) each end it; the consumer replaces
    it to wait again."""

    __slots__ = ("_iterator", "_task", "_go", "woken", "outcome", "stopped")

    def __init__(self, iterator) -> None:
        self._iterator = iterator
        self._task: asyncio.Task | None = None
        self._go: asyncio.Future | None = None
        self.woken: asyncio.Future | None = None
        self.outcome: tuple | None = None
        self.stopped = False

    def ask(self, loop) -> None:
        """Start the next read."""
        self.outcome = None
        self.woken = loop.create_future()
        if self._task is None:
            self._task = loop.create_task(self._run())
        else:
            self._go.set_result(None)

    def wake_up(self) -> None:
        if not self.woken.done():
            self.woken.set_result(None)

    def stop(self, _stopper=None) -> None:
        self.stopped = True
        self.wake_up()

    async def _run(self) -> None:
        iterator = self._iterator
        while True:
            try:
                item = await iterator.__anext__()
            except StopAsyncIteration:
                self._ended((_END, None))
                return
            except asyncio.CancelledError as exc:
                # (close()'s, or one the events raised themselves: the consumer hears of it)
                self._ended((None, exc))
                raise
            except BaseException as exc:
                self._ended((None, exc))
                return
            self._go = go = asyncio.get_running_loop().create_future()
            self._ended((item, None))
            await go

    def _ended(self, outcome: tuple) -> None:
        self.outcome = outcome
        self.wake_up()

    async def close(self) -> None:
        """Cancel a read still going on, then close the events (which aborts the engine
        request behind them when they were not over)."""
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except BaseException:
                pass
        aclose = getattr(self._iterator, "aclose", None)
        if aclose is not None:
            await aclose()
