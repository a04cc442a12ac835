"""How a stream reaches the socket: one write per engine output, the role chunk with the
first output, and the last output's events together with the usage chunk and [DONE] (each write is a syscall on a busy front end).
The app is served by uvicorn as in production; an ASGI wrapper records each body message the
app hands to the server, which uvicorn writes to the socket as one `transport.write`."""

from __future__ import annotations

import json

import openai

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
