"""Timing one streaming request: SSE parsing, error kinds and connection use, against a
scripted HTTP/1.1 server on a loopback socket (real aiohttp client, real TCP)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from clients.sse import open_session, stream_chat

@dataclass
class HangUp:
    """Write `data` (possibly nothing), then close the connection."""

    data: bytes = b""


#: What the scripted server does with one request: the bytes to write back (the connection
#: stays open for the next request), or a HangUp. It may wait, to script slow answers.
Behaviour = Callable[["Seen"], Awaitable["bytes | HangUp"]]


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    connection: int


@dataclass
class Server:
    port: int
    requests: list[Seen] = field(default_factory=list)
    connections: int = 0
    open_now: int = 0
    most_open: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"


async def _serve(behaviour: Behaviour, client: Callable[[Server], Awaitable[object]]) -> tuple[object, Server]:
    """Run `client(server)` against a scripted keep-alive HTTP/1.1 server; return its result."""
    state = Server(port=0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        conn = state.connections
        state.open_now += 1
        state.most_open = max(state.most_open, state.open_now)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                seen = Seen(method, path, headers, body, conn)
                state.requests.append(seen)
                answer = await behaviour(seen)
                writer.write(answer.data if isinstance(answer, HangUp) else answer)
                await writer.drain()
                if isinstance(answer, HangUp):
                    return
        finally:
            state.open_now -= 1
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        return await client(state), state
    finally:
        server.close()


def run(behaviour: Behaviour, timeout: float = 10.0) -> tuple[object, Server]:
    """One request with `stream_chat`, in a fresh session."""

    async def client(server: Server):
        async with open_session(4, timeout, timeout) as session:
            return await stream_chat(session, server.url, b'{"stream": true}')

    return asyncio.run(_serve(behaviour, client))


def sse(*events) -> bytes:
    out = []
    for e in events:
        out.append(e if isinstance(e, str) else "data: " + json.dumps(e))
    return ("\n\n".join(out) + "\n\n").encode()


def chunked(body: bytes, status: int = 200, ctype: str = "text/event-stream", end: bool = True) -> bytes:
    """An HTTP/1.1 response with a chunked body (one chunk per SSE event), as servers stream."""
    head = f"HTTP/1.1 {status} X\r\ncontent-type: {ctype}\r\ntransfer-encoding: chunked\r\n\r\n".encode()
    parts = [p + b"\n\n" for p in body.split(b"\n\n") if p]
    out = head + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts)
    return out + (b"0\r\n\r\n" if end else b"")


def answer(body: bytes, status: int = 200, **kw) -> Behaviour:
    async def behaviour(seen: Seen) -> bytes:
        return chunked(body, status, **kw)

    return behaviour


def content(text: str) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


ROLE = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
USAGE = {"choices": [], "usage": {"prompt_tokens": 42, "completion_tokens": 7, "total_tokens": 49}}


def test_success_uses_usage_token_count():
    r, _ = run(answer(sse(ROLE, content("a"), ": keepalive", content("b"), USAGE, "data: [DONE]")))
    assert r.ok, r.error
    assert r.output_tokens == 7 and r.prompt_tokens == 42
    assert r.started <= r.first_token <= r.last_token <= r.finished


def test_without_usage_counts_content_chunks():
    r, _ = run(answer(sse(ROLE, content("a"), content("b"), content("c"), "data: [DONE]")))
    assert r.ok and r.output_tokens == 3 and r.prompt_tokens is None


def test_crlf_line_ends_are_understood():
    body = sse(content("a"), content("b"), "data: [DONE]").replace(b"\n", b"\r\n")
    r, _ = run(answer(body))
    assert r.ok and r.output_tokens == 2


def test_role_chunk_is_not_the_first_token():
    r, _ = run(answer(sse(ROLE, "data: [DONE]")))
    assert r.error == "no_output" and r.first_token is None


def test_request_is_posted_with_body():
    _, server = run(answer(sse(content("x"), "data: [DONE]")))
    [seen] = server.requests
    assert (seen.method, seen.path, seen.body) == ("POST", "/v1/chat/completions", b'{"stream": true}')
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["accept"] == "text/event-stream"


@pytest.mark.parametrize("status", [400, 429, 503])
def test_http_status_is_the_error_kind(status):
    r, _ = run(answer(b'{"error": {"message": "no"}}', status, ctype="application/json"))
    assert r.error == f"http_{status}" and not r.ok


def test_error_event_in_stream():
    r, _ = run(answer(sse(content("a"), {"error": {"message": "engine died"}}, "data: [DONE]")))
    assert r.error == "stream_error"


def test_stream_without_done_is_incomplete():
    r, _ = run(answer(sse(content("a"))))
    assert r.error == "incomplete"


def test_malformed_chunk():
    r, _ = run(answer(sse(content("a"), "data: {not json", "data: [DONE]")))
    assert r.error == "bad_chunk"


def test_oversized_line_is_a_bad_chunk_not_a_crash():
    r, _ = run(answer(sse(content("a"), "data: " + "x" * (3 << 20), "data: [DONE]")))
    assert r.error == "bad_chunk"


def test_refused_connection():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def go():
        async with open_session(1, 5, 5) as session:
            return await stream_chat(session, f"http://127.0.0.1:{port}/v1/chat/completions", b"{}")

    assert asyncio.run(go()).error == "connect"


def test_no_answer_within_the_timeout():
    async def silent(seen: Seen) -> bytes:
        await asyncio.sleep(5)
        return b""

    r, _ = run(silent, timeout=0.3)
    assert r.error == "timeout"
    assert r.finished - r.started < 3


def test_connection_cut_mid_stream():
    async def cut(seen: Seen) -> HangUp:
        return HangUp(chunked(sse(content("a"), content("b")), end=False)[:-3])

    r, _ = run(cut)
    assert r.error == "disconnected"


def test_hang_up_before_any_answer():
    async def hang_up(seen: Seen) -> HangUp:
        return HangUp()

    r, _ = run(hang_up)
    assert r.error == "disconnected"


def test_sequential_requests_reuse_one_connection():
    async def client(server: Server):
        async with open_session(4, 10, 10) as session:
            return [await stream_chat(session, server.url, b"{}") for _ in range(10)]

    results, server = asyncio.run(_serve(answer(sse(content("a"), "data: [DONE]")), client))
    assert all(r.ok for r in results)
    assert len(server.requests) == 10 and server.connections == 1


def test_concurrent_requests_are_all_in_flight_at_once():
    """64 streams in flight need 64 connections open together: the server answers none
    until all 64 requests have arrived, so a client that held fewer would time out."""
    n = 64
    arrived = asyncio.Event()
    count = 0

    async def gather_then_answer(seen: Seen) -> bytes:
        nonlocal count
        count += 1
        if count == n:
            arrived.set()
        await arrived.wait()
        return chunked(sse(content("a"), "data: [DONE]"))

    async def client(server: Server):
        async with open_session(n, 20, 5) as session:
            return await asyncio.gather(*(stream_chat(session, server.url, b"{}") for _ in range(n)))

    results, server = asyncio.run(_serve(gather_then_answer, client))
    assert [r.error for r in results] == [None] * n
    assert server.most_open == n


def test_session_caps_connections():
    """With a cap of 4, no more than 4 connections are ever open, and every request is served."""

    async def slowish(seen: Seen) -> bytes:
        await asyncio.sleep(0.01)
        return chunked(sse(content("a"), "data: [DONE]"))

    async def client(server: Server):
        async with open_session(4, 20, 5) as session:
            return await asyncio.gather(*(stream_chat(session, server.url, b"{}") for _ in range(40)))

    results, server = asyncio.run(_serve(slowish, client))
    assert all(r.ok for r in results)
    assert server.most_open <= 4 and len(server.requests) == 40


# --- chunks a server should not send: each is the request's own error, never the run's ---


def test_an_error_event_is_a_stream_error_and_a_null_error_field_is_not():
    r, _ = run(answer(sse(ROLE, content("a"), 'event: error\ndata: {"message": "boom"}', content("b"), USAGE,
                          "data: [DONE]")))
    assert r.error == "stream_error"
    r, _ = run(answer(sse(ROLE, {**content("a"), "error": None}, content("b"), USAGE, "data: [DONE]")))
    assert r.ok, r.error


@pytest.mark.parametrize("chunk", [
    {"choices": [None]},
    {"choices": [{"delta": "x"}]},
    {"choices": {"0": {"delta": {"content": "x"}}}},
    {"choices": [{"delta": {"content": 5}}]},
    {"choices": [], "usage": "many"},
    {"choices": [], "usage": {"completion_tokens": "7"}},
    {"choices": [], "usage": {"completion_tokens": -1}},
    {"choices": [], "usage": {"completion_tokens": 3, "prompt_tokens": "x"}},
])
def test_a_malformed_chunk_is_a_bad_chunk_for_its_request(chunk):
    r, _ = run(answer(sse(ROLE, content("a"), chunk, content("b"), "data: [DONE]")))
    assert r.error == "bad_chunk"


def test_tokens_without_a_usage_chunk_are_marked_as_counted_from_chunks():
    r, _ = run(answer(sse(ROLE, content("ab"), content("cd"), "data: [DONE]")))
    assert r.ok and r.output_tokens == 2 and r.tokens_from_usage is False
    r, _ = run(answer(sse(ROLE, content("ab"), USAGE, "data: [DONE]")))
    assert r.ok and r.output_tokens == 7 and r.tokens_from_usage is True


def test_text_with_a_usage_of_no_tokens_is_bad_usage():
    zero = {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 0}}
    r, _ = run(answer(sse(ROLE, content("a"), zero, "data: [DONE]")))
    assert r.error == "bad_usage"


def test_a_fixed_output_length_the_server_did_not_keep_is_an_error():
    async def client(server: Server):
        async with open_session(4, 10, 10) as session:
            return [await stream_chat(session, server.url, b"{}", expected_tokens=n) for n in (7, 16)]

    (right, short), _ = asyncio.run(_serve(answer(sse(ROLE, content("a"), content("b"), USAGE, "data: [DONE]")),
                                           client))
    assert right.ok and short.error == "output_length"


def test_without_a_usage_chunk_more_chunks_than_the_fixed_length_is_an_error():
    """Each content chunk holds a token at least: 3 of them for a fixed length of 2 is a
    length the server did not keep, usage chunk or not (fewer may be several tokens each)."""
    async def client(server: Server):
        async with open_session(4, 10, 10) as session:
            return [await stream_chat(session, server.url, b"{}", expected_tokens=n) for n in (2, 3, 5)]

    (over, right, under), _ = asyncio.run(_serve(
        answer(sse(ROLE, content("a"), content("b"), content("c"), "data: [DONE]")), client))
    assert over.error == "output_length"
    assert right.ok and under.ok and not under.tokens_from_usage


def test_a_chunk_nested_deeper_than_json_parses_is_a_bad_chunk():
    deep = "data: " + "[" * 100_000 + "]" * 100_000
    r, _ = run(answer(sse(ROLE, content("a"), deep, content("b"), USAGE, "data: [DONE]")))
    assert r.error == "bad_chunk"


@pytest.mark.parametrize("usage", [{}, {"completion_tokens": None}])
def test_a_usage_without_a_count_counts_nothing_and_fails_nothing(usage):
    r, _ = run(answer(sse(ROLE, content("ab"), {"choices": [], "usage": usage}, "data: [DONE]")))
    assert r.ok and r.tokens_from_usage is False and r.output_tokens == 1
