"""Serve `create_app(...)` with a scripted engine from uvicorn in a background thread:
real HTTP, real middleware and streaming, no model. For fast edge-case tests."""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import contextmanager
from typing import Any, Awaitable

import httpx
import uvicorn

from server.app import create_app
from server.cli import uvicorn_config
from server.engine.base import ModelInfo
from server.engine.scripted import ScriptedEngine
from server.settings import Settings
from support.live_server import free_port


class AppServer:
    def __init__(self, app, host: str = "127.0.0.1", wait_ready: bool = True) -> None:
        """`wait_ready=False`: entering returns once the server listens, ready or not."""
        self.app = app
        self.host = host
        self.wait_ready = wait_ready
        self.port = free_port(host)
        # the server's own uvicorn configuration (its HTTP protocol and limits), on a free port
        config = uvicorn_config(app, app.state.runtime.settings, host=host, port=self.port,
                                log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # not the main thread
        self.loop: asyncio.AbstractEventLoop | None = None
        serve = self.server.serve

        async def serve_and_record_loop(*args, **kwargs):
            self.loop = asyncio.get_running_loop()
            return await serve(*args, **kwargs)

        self.server.serve = serve_and_record_loop
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def runtime(self):
        return self.app.state.runtime

    def call(self, work: Awaitable[Any], timeout: float = 30) -> Any:
        """Run a coroutine on the server's event loop (as its own code would) and return its
        result."""
        assert self.loop is not None, "the server is not running"
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout)

    def __enter__(self) -> "AppServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("app server did not start")
            time.sleep(0.02)
        # 401: probes behind a key (auth_health_endpoints) — up all the same.
        while self.wait_ready and httpx.get(self.base_url + "/ready").status_code not in (200, 401):
            if time.monotonic() > deadline:
                raise RuntimeError("app server not ready")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def scripted_app(tokenizer, settings: Settings | None = None, engine: ScriptedEngine | None = None,
                 family: str = "qwen2-vl", **settings_overrides):
    """An app on a `ScriptedEngine`; returns (app, engine)."""
    settings = settings or Settings(**{"served_model_name": "scripted", **settings_overrides})
    engine = engine or ScriptedEngine(ModelInfo(family=family, max_model_len=4096, tokenizer=tokenizer))
    app = create_app(settings, engine=engine, model_names=[settings.served_model_name or "scripted"])
    return app, engine


@contextmanager
def scripted_server(tokenizer, **kwargs):
    """`scripted_app(tokenizer, **kwargs)` served (an `AppServer`, with `.engine`)."""
    app, engine = scripted_app(tokenizer, **kwargs)
    with AppServer(app) as server:
        server.engine = engine
        yield server
