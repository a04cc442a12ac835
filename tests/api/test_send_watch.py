"""The send timeout the gateway middleware keeps on each write of a response, behind the
connection-level one of `http_protocol`: a send that never returns (an ASGI server that
waits on a client without a timeout of its own) is given up after `--send-timeout`, a
slow one that keeps going is not, and a cancellation that is not the watch's stays one."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import httpx
import pytest

from server.engine.base import ModelInfo
from server.engine.scripted import ScriptedEngine
from server.middleware import _SendStalled, _SendWatch
from support.app_server import AppServer, scripted_app


class SlowSends:
    """An ASGI wrapper whose `send` takes `delay` seconds for each chat-completion body
    message after the first (None: never returns)."""

    def __init__(self, app, delay: float | None) -> None:
        self.app = app
        self.state = app.state
        self.delay = delay
        self.bodies = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].endswith("/chat/completions"):
            return await self.app(scope, receive, send)

        async def slow(message):
            if message["type"] == "http.response.body":
                self.bodies += 1
                if self.bodies > 1:
                    if self.delay is None:
                        await asyncio.Event().wait()
                    await asyncio.sleep(self.delay)
            await send(message)

        await self.app(scope, receive, slow)


def engine_for(tokenizer, reply: str, chunk_chars: int, delay: float = 0.0) -> ScriptedEngine:
    return ScriptedEngine(ModelInfo(family="qwen2-vl", max_model_len=10**6, tokenizer=tokenizer),
                          default_reply=reply, chunk_chars=chunk_chars, delay=delay)


def stream_in_thread(url: str, result: dict) -> threading.Thread:
    def run():
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", timeout=15,
                              json={"messages": [{"role": "user", "content": "hi"}], "stream": True}) as r:
                result["status"] = r.status_code
                result["body"] = b"".join(r.iter_bytes())
        except httpx.HTTPError as exc:
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_send_that_never_returns_is_given_up_after_the_send_timeout(tiny_tokenizer, caplog):
    engine = engine_for(tiny_tokenizer, "x" * 400, chunk_chars=10, delay=0.01)
    app, _ = scripted_app(tiny_tokenizer, engine=engine, send_timeout=0.5)
    with AppServer(SlowSends(app, None)) as srv, caplog.at_level(logging.INFO, logger="server.middleware"):
        result: dict = {}
        t0 = time.monotonic()
        stream_in_thread(srv.base_url, result)
        deadline = t0 + 5
        while srv.runtime.admission.active < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        while srv.runtime.admission.active and time.monotonic() < deadline:
            time.sleep(0.02)
        waited = time.monotonic() - t0
        assert srv.runtime.admission.active == 0  # the slot came back while the send still hangs
        assert 0.4 < waited < 4, waited
        while engine.num_unfinished_requests() and time.monotonic() < deadline + 2:
            time.sleep(0.02)
        assert engine.num_unfinished_requests() == 0  # and the engine request was closed
        assert any("took nothing" in rec.getMessage() for rec in caplog.records)


def test_sends_that_are_slow_but_each_within_the_timeout_finish_the_answer(tiny_tokenizer):
    # Six writes of 0.25 s each: 1.5 s in all, three times the 0.5 s allowed for one send.
    engine = engine_for(tiny_tokenizer, "abcdef", chunk_chars=1, delay=0.0)
    app, _ = scripted_app(tiny_tokenizer, engine=engine, send_timeout=0.5)
    wrapped = SlowSends(app, 0.25)
    with AppServer(wrapped) as srv:
        result: dict = {}
        stream_in_thread(srv.base_url, result).join(15)
    assert result.get("status") == 200, result
    body = result["body"].decode()
    assert body.endswith("data: [DONE]\n\n")
    assert wrapped.bodies >= 6


def run(coro):
    return asyncio.run(coro)


def test_the_watch_turns_only_its_own_cancellation_into_a_stall():
    async def stalled():
        watch = _SendWatch(0.1)
        try:
            with pytest.raises(_SendStalled):
                await watch.send(lambda m: asyncio.sleep(5), {})
            # a later send that another party cancels is a plain cancellation
            task = asyncio.current_task()
            asyncio.get_running_loop().call_later(0.05, task.cancel)
            with pytest.raises(asyncio.CancelledError):
                await watch.send(lambda m: asyncio.sleep(5), {})
            assert task.uncancel() == 0
            # and a quick send after all that goes through
            await watch.send(lambda m: asyncio.sleep(0), {})
        finally:
            watch.close()

    run(stalled())


def test_many_quick_sends_over_longer_than_the_timeout_are_not_cut():
    async def quick():
        watch = _SendWatch(0.05)
        try:
            end = time.monotonic() + 0.3
            sends = 0
            while time.monotonic() < end:
                await watch.send(lambda m: asyncio.sleep(0.01), {})
                sends += 1
            await asyncio.sleep(0.1)  # the timer fires with no send going on: nothing happens
            await watch.send(lambda m: asyncio.sleep(0.01), {})
            return sends
        finally:
            watch.close()

    assert run(quick()) > 10


def test_a_send_cancelled_by_its_client_going_away_is_not_a_stall():
    async def gone():
        watch = _SendWatch(0.2)
        task = asyncio.ensure_future(watch.send(lambda m: asyncio.sleep(5), {}))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.3)  # the watch's timer finds no send going on
        watch.close()

    run(gone())
