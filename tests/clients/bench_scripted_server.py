"""The real qwen-vl-serve app on a scripted engine, served by uvicorn in a thread on a
loopback port: a cheap live target for the load generator (no model, no vLLM)."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import httpx

from server.app import create_app
from server.engine.base import ModelInfo
from server.engine.scripted import ScriptedEngine
from server.settings import Settings

MODEL = "scripted"


class WordTokenizer:
    """Just enough of a Hugging Face tokenizer for the prompt renderer: one token per word."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True, **kwargs) -> str:
        texts = []
        for m in messages:
            for part in m["content"]:
                texts.append(part.get("text", "<image>"))
        return " ".join(texts) + (" assistant:" if add_generation_prompt else "")

    def encode(self, text: str, add_special_tokens: bool = False, split_special_tokens: bool = False) -> list[int]:
        return [len(w) for w in text.split()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def scripted_server(delay: float = 0.0, reply_tokens: int = 256, **settings):
    """Yields (base_url, engine). Replies are `reply_tokens` one-character tokens, each
    `delay` seconds after the previous one; `max_tokens` cuts them short."""
    import uvicorn

    engine = ScriptedEngine(
        ModelInfo(family="qwen2-vl", max_model_len=1 << 20, tokenizer=WordTokenizer()),
        default_reply="x" * reply_tokens,
        chunk_chars=1,
        delay=delay,
    )
    port = _free_port()
    app = create_app(Settings(served_model_name=MODEL, port=port, **settings), engine=engine)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    else:
        server.should_exit = True
        raise RuntimeError("scripted server did not become ready")
    try:
        yield base, engine
    finally:
        server.should_exit = True
        thread.join(10)
