"""How a stream reaches the socket: one write per engine output, the role chunk with the
first output, and the last output's events together with the usage chunk and [DONE] (each write is a syscall on a busy front end);
the response head goes out with the first write, the chunked encoding's end with the last.
The app is served by uvicorn as in production; an ASGI wrapper records each body message the
app hands to the server, and a wrapper of the connection's transport each write that reaches it."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from server import http_protocol

from server.engine.base import ModelInfo
from server.engine.scripted import ScriptedEngine
from support.app_server import AppServer, scripted_app


class BodyRecorder:
    """Passes everything through; keeps the body of each `http.response.body` message of
    chat-completion responses."""

    def __init__(self, app) -> None:
        self.app = app
        self.state = app.state
        self.bodies: list[bytes] = []

    async def __call__(self, scope, receive, send):
        async def record(message):
            if message["type"] == "http.response.body" and scope["path"].endswith("/chat/completions"):
                if message.get("body"):
                    self.bodies.append(message["body"])
            await send(message)

        await self.app(scope, receive, record if scope["type"] == "http" else send)


def events(body: bytes) -> list[dict | str]:
    """The SSE data payloads of one body message, parsed ([DONE] stays a string)."""
    out: list[dict | str] = []
    for block in body.decode().split("\n\n"):
        data = [line[len("data: "):] for line in block.splitlines() if line.startswith("data: ")]
        if data:
            payload = "\n".join(data)
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


class RecordingTransport:
    """A connection's transport that keeps a copy of every write (each one `send` on the socket)."""

    def __init__(self, transport) -> None:
        self._transport = transport
        self.writes: list[bytes] = []

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def write(self, data) -> None:
        self.writes.append(bytes(data))
        self._transport.write(data)


@pytest.fixture
def socket_writes(monkeypatch):
    """The writes of every connection the server accepts from now on, by connection."""
    connections: list[RecordingTransport] = []
    wrap = http_protocol._LingeringTransport.__init__

    def recording(self, transport, protocol):
        connections.append(RecordingTransport(transport))
        wrap(self, connections[-1], protocol)

    monkeypatch.setattr(http_protocol._LingeringTransport, "__init__", recording)
    return connections


def run_stream(tokenizer, reply: str, **request):
    engine = ScriptedEngine(ModelInfo(family="qwen2-vl", max_model_len=4096, tokenizer=tokenizer),
                            default_reply=reply, chunk_chars=1)
    app, _ = scripted_app(tokenizer, engine=engine)
    recorder = BodyRecorder(app)
    with AppServer(recorder) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        stream = client.chat.completions.create(
            model="scripted", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True}, **request)
        chunks = list(stream)
    return recorder.bodies, chunks


def test_the_last_token_finish_usage_and_done_go_out_in_one_write(tiny_tokenizer):
    bodies, chunks = run_stream(tiny_tokenizer, "abcdef")
    writes = [events(b) for b in bodies]
    # the role with the first token, one write per token after it but the last, then the
    # last token with the rest
    assert len(writes) == 5 + 1, writes
    assert writes[0][0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len(writes[0]) == 2 and writes[0][1]["choices"][0]["delta"]["content"] == "a"
    assert [w[0]["choices"][0]["delta"]["content"] for w in writes[1:-1]] == list("bcde")
    assert all(len(w) == 1 for w in writes[1:-1])
    last = writes[-1]
    assert len(last) == 4, last
    assert last[0]["choices"][0]["delta"]["content"] == "f"
    assert last[1]["choices"][0]["finish_reason"] == "stop"
    assert last[2]["choices"] == [] and last[2]["usage"]["completion_tokens"] == 6
    assert last[3] == "[DONE]"
    # what the SDK sees is unchanged: every event, in order
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "abcdef"
    assert chunks[-1].usage.completion_tokens == 6


def test_every_choice_finishes_in_the_final_write(tiny_tokenizer):
    # n=2 under greedy decoding: one generation fanned out to two choices
    bodies, chunks = run_stream(tiny_tokenizer, "xyz", n=2, temperature=0)
    writes = [events(b) for b in bodies]
    assert [e["choices"][0]["delta"].get("role") for e in writes[0][:2]] == ["assistant", "assistant"]
    last = writes[-1]
    finishes = [e["choices"][0]["index"] for e in last if isinstance(e, dict) and e["choices"]
                and e["choices"][0]["finish_reason"]]
    assert sorted(finishes) == [0, 1]
    assert last[-1] == "[DONE]" and last[-2]["usage"]["completion_tokens"] == 6
    # no write before the last one carries a finish reason
    assert not any(isinstance(e, dict) and e["choices"] and e["choices"][0]["finish_reason"]
                   for w in writes[:-1] for e in w)
    texts = {0: "", 1: ""}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == {0: "xyz", 1: "xyz"}


def chat_writes(connections: list[RecordingTransport]) -> list[bytes]:
    """The writes of the one connection that carried a chat completion."""
    chats = [c.writes for c in connections if any(b"chatcmpl-" in w for w in c.writes)]
    assert len(chats) == 1, chats
    return chats[0]


def test_a_stream_is_one_socket_write_per_engine_output_with_the_head_and_the_end(tiny_tokenizer, socket_writes):
    bodies, chunks = run_stream(tiny_tokenizer, "abcdef")
    writes = chat_writes(socket_writes)
    # six outputs, six sends: the head goes with the first (uvicorn would send it alone),
    # the chunked encoding's last chunk with the last (Starlette sends it as a message of its own)
    assert len(writes) == 6, writes
    head, _, first = writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"text/event-stream" in head
    assert b'"role":"assistant"' in first and b'"content":"a"' in first
    assert writes[-1].endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "abcdef"


def test_a_whole_answer_goes_out_in_one_write_and_a_head_only_answer_at_once(tiny_tokenizer, socket_writes):
    app, _ = scripted_app(tiny_tokenizer)
    with AppServer(app) as srv:
        r = httpx.post(srv.base_url + "/v1/chat/completions", json={
            "model": "scripted", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ok"
        [write] = chat_writes(socket_writes)
        assert write.startswith(b"HTTP/1.1 200 ") and write.endswith(r.content)
        # a refusal too: its head and its error body in one write
        bad = httpx.post(srv.base_url + "/v1/chat/completions", json={"model": "scripted", "messages": []})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
        assert any(w.startswith(b"HTTP/1.1 400 ") and w.endswith(bad.content)
                   for c in socket_writes for w in c.writes)
        # answers without a body are not held back for one
        with httpx.Client(timeout=3) as client:
            assert client.head(srv.base_url + "/health").status_code in (200, 405)
            assert client.options(srv.base_url + "/v1/models").status_code in (200, 204, 405)


def test_a_slow_first_token_gets_the_head_with_the_first_keepalive_comment(tiny_tokenizer):
    engine = ScriptedEngine(ModelInfo(family="qwen2-vl", max_model_len=4096, tokenizer=tiny_tokenizer),
                            default_reply="ab", chunk_chars=1, delay=2.0)
    app, _ = scripted_app(tiny_tokenizer, engine=engine, sse_keepalive_interval=0.3)
    with AppServer(app) as srv:
        began = time.monotonic()
        with httpx.stream("POST", srv.base_url + "/v1/chat/completions", timeout=10, json={
                "model": "scripted", "messages": [{"role": "user", "content": "hi"}], "stream": True}) as r:
            headed = time.monotonic() - began
            lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200
    assert headed < 1.5, headed  # the first comment's time, not the first token's (2 s)
    assert lines[0] == ": keep-alive"
    assert lines[-1] == "data: [DONE]"
