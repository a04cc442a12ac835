"""Timing one streaming request: SSE parsing and error kinds, on httpx's MockTransport."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from clients.sse import stream_chat

URL = "http://server/v1/chat/completions"


def sse(*events) -> bytes:
    out = []
    for e in events:
        out.append(e if isinstance(e, str) else "data: " + json.dumps(e))
    return ("\n\n".join(out) + "\n\n").encode()


def content(text: str) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


ROLE = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
USAGE = {"choices": [], "usage": {"prompt_tokens": 42, "completion_tokens": 7, "total_tokens": 49}}


def run(handler) -> object:
    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await stream_chat(client, URL, b'{"stream": true}')

    return asyncio.run(go())


def answer(body: bytes, status: int = 200):
    return lambda request: httpx.Response(status, content=body, headers={"content-type": "text/event-stream"})


def test_success_uses_usage_token_count():
    r = run(answer(sse(ROLE, content("a"), ": keepalive", content("b"), USAGE, "data: [DONE]")))
    assert r.ok, r.error
    assert r.output_tokens == 7 and r.prompt_tokens == 42
    assert r.started <= r.first_token <= r.last_token <= r.finished


def test_without_usage_counts_content_chunks():
    r = run(answer(sse(ROLE, content("a"), content("b"), content("c"), "data: [DONE]")))
    assert r.ok and r.output_tokens == 3 and r.prompt_tokens is None


def test_role_chunk_is_not_the_first_token():
    r = run(answer(sse(ROLE, "data: [DONE]")))
    assert r.error == "no_output" and r.first_token is None


def test_request_is_posted_with_body():
    seen = {}

    def handler(request: httpx.Request):
        seen["method"], seen["body"] = request.method, request.content
        seen["ctype"] = request.headers["content-type"]
        return answer(sse(content("x"), "data: [DONE]"))(request)

    assert run(handler).ok
    assert seen == {"method": "POST", "body": b'{"stream": true}', "ctype": "application/json"}


@pytest.mark.parametrize("status", [400, 429, 503])
def test_http_status_is_the_error_kind(status):
    r = run(answer(b'{"error": {"message": "no"}}', status))
    assert r.error == f"http_{status}" and not r.ok


def test_error_event_in_stream():
    r = run(answer(sse(content("a"), {"error": {"message": "engine died"}}, "data: [DONE]")))
    assert r.error == "stream_error"


def test_stream_without_done_is_incomplete():
    assert run(answer(sse(content("a")))).error == "incomplete"


def test_malformed_chunk():
    assert run(answer(sse(content("a"), "data: {not json", "data: [DONE]"))).error == "bad_chunk"


@pytest.mark.parametrize(
    "exc, kind",
    [
        (httpx.ConnectError("refused"), "connect"),
        (httpx.ReadTimeout("slow"), "timeout"),
        (httpx.RemoteProtocolError("peer closed"), "disconnected"),
    ],
)
def test_transport_failures_become_kinds(exc, kind):
    def handler(request):
        raise exc

    assert run(handler).error == kind
