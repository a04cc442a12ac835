"""Limits on the request head (server/http_protocol.py): its size, and the time it may take to
arrive. Raw sockets against the server's own uvicorn configuration, scripted engine."""

from __future__ import annotations

import json
import re
import select
import socket
import time

import httpx
import pytest

from support.app_server import scripted_server

HEADER_TIMEOUT = 1.0
#: How much earlier than its delay the server's timer may fire, as measured here: uvloop's
#: timers count in milliseconds from the loop's time cached at the start of an iteration.
TIMER_SLACK = 0.05
MAX_HEADER_BYTES = 16 * 1024


@pytest.fixture(scope="module")
def srv(tiny_tokenizer):
    with scripted_server(tiny_tokenizer, header_timeout=HEADER_TIMEOUT, max_header_bytes=MAX_HEADER_BYTES) as server:
        yield server


def connect(srv) -> socket.socket:
    sock = socket.create_connection((srv.host, srv.port), timeout=10)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def read_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length, however many reads it arrives in (the
    server may write its head and its body separately)."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, received
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    assert length, head
    while len(body) < int(length.group(1)):
        chunk = sock.recv(65536)
        assert chunk, received
        body += chunk
    return head + b"\r\n\r\n" + body


def error_of(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"connection: close" in head.lower()
    # every answer, the protocol's own refusals too, names itself for the logs
    assert re.search(rb"(?im)^x-request-id: [0-9a-f]{32}\r?$", head), head
    return status, json.loads(body)["error"]


def refusal_of(srv, raw: bytes) -> tuple[int, dict]:
    """Send `raw` on a new connection; the status and error of the answer that ends it."""
    sock = connect(srv)
    try:
        sock.sendall(raw)
        return error_of(read_all(sock))
    finally:
        sock.close()


def healthy(srv) -> bool:
    return httpx.get(srv.base_url + "/health", timeout=5).status_code == 200


def chat_request(extra_headers: str = "", body: bytes | None = None) -> bytes:
    body = body if body is not None else json.dumps(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"{extra_headers}Content-Length: {len(body)}\r\n\r\n").encode() + body


def test_answers_do_not_name_the_server_software(srv):
    """uvicorn added `server: uvicorn` to every answer, refusals too."""
    answers = [httpx.get(srv.base_url + "/health", timeout=5),
               httpx.post(srv.base_url + "/v1/chat/completions", json={"messages": []}, timeout=5),
               httpx.post(srv.base_url + "/v1/chat/completions", timeout=30,
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True})]
    assert [a.status_code for a in answers] == [200, 400, 200]
    for answer in answers:
        assert "server" not in answer.headers, answer.headers
        assert "uvicorn" not in str(answer.headers).lower()


@pytest.mark.parametrize("size", [MAX_HEADER_BYTES + 1, 10 * 1024 * 1024])
def test_a_head_over_the_limit_gets_a_431_and_the_connection_closes(srv, size):
    sock = connect(srv)
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent = 0
        try:
            while sent < size:  # the server closes while this is still sending
                sock.sendall(b"a" * 65536)
                sent += 65536
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, err = error_of(read_all(sock))
    except ConnectionResetError:
        pytest.fail("the connection was reset without an answer")
    finally:
        sock.close()
    assert status == 431 and err["code"] == "headers_too_large"
    assert str(MAX_HEADER_BYTES) in err["message"]
    assert healthy(srv)


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_head_over_the_limit_that_arrives_whole_gets_a_431(srv, method):
    """Sent in one write, the head is complete within one read: it is measured as parsed."""
    big = {"X-Big": "a" * (MAX_HEADER_BYTES + 100)}
    before = len(srv.engine.history)
    if method == "GET":
        r = httpx.get(srv.base_url + "/health", headers=big)
    else:
        r = httpx.post(srv.base_url + "/v1/chat/completions", headers=big,
                       json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 431, r.text
    assert r.json()["error"]["code"] == "headers_too_large"
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    assert len(srv.engine.history) == before  # the app never saw it
    assert healthy(srv)


def test_a_whole_head_over_the_limit_with_a_body_behind_it_gets_the_431_not_a_reset(srv):
    """The body still on its way when the server refuses the head must not reset the
    connection before the client reads the answer (closing with unread input does)."""
    sock = connect(srv)
    body_size = 8 * 1024 * 1024
    try:
        sock.sendall(chat_request(body=b"x" * 0, extra_headers=f"X-Big: {'a' * (MAX_HEADER_BYTES + 100)}\r\n")
                     .replace(b"Content-Length: 0", f"Content-Length: {body_size}".encode()))
        try:
            for _ in range(body_size // 65536):
                sock.sendall(b"x" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, err = error_of(read_all(sock))
    except ConnectionResetError:
        pytest.fail("the connection was reset without an answer")
    finally:
        sock.close()
    assert status == 431 and err["code"] == "headers_too_large"
    assert healthy(srv)


def test_many_small_headers_count_together(srv):
    headers = {f"X-H{i}": "v" * 100 for i in range(MAX_HEADER_BYTES // 100 + 10)}
    r = httpx.get(srv.base_url + "/health", headers=headers)
    assert r.status_code == 431
    headers = {f"X-H{i}": "v" * 100 for i in range(MAX_HEADER_BYTES // 200)}
    assert httpx.get(srv.base_url + "/health", headers=headers).status_code == 200


def test_a_head_under_the_limit_and_a_large_body_are_served(srv):
    sock = connect(srv)
    big_body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                           "ignored": "x" * 300_000}).encode()
    try:
        # headers of 12 KiB, then a body far over the head limit in the same writes
        sock.sendall(chat_request(f"X-Padding: {'p' * 12 * 1024}\r\n", big_body))
        head = sock.recv(65536)
    finally:
        sock.close()
    assert head.startswith(b"HTTP/1.1 200"), head[:200]


def raw_post(srv, content_length: str, body: bytes) -> bytes:
    """A chat request with a Content-Length spelled as given; the answer, read to the close."""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Connection: close\r\nContent-Length: {content_length}\r\n\r\n").encode()
    sock = connect(srv)
    try:
        sock.sendall(head + body)
        return read_all(sock)
    finally:
        sock.close()


def test_a_declared_length_with_spaces_around_it_still_counts_against_the_body_cap(srv):
    """The HTTP parser passes "100000000 " on as it came; the cap must still see 100 MB
    (it skipped such a value, and the body was then read whole, without a cap)."""
    limit = srv.runtime.settings.max_request_bytes
    status, err = error_of(raw_post(srv, f"{limit + 1} ", b"{}"))
    assert status == 413 and str(limit) in err["message"]
    assert healthy(srv)


def test_a_declared_length_of_thousands_of_leading_zeros_is_read_as_its_value(srv):
    """5,000 leading zeros are more digits than int() converts: a plain-text 500 before."""
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
    answer = raw_post(srv, "0" * 5000 + str(len(body)), body)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert b'"finish_reason"' in answer
    limit = srv.runtime.settings.max_request_bytes
    status, err = error_of(raw_post(srv, "0" * 5000 + str(limit + 1), b"{}"))
    assert status == 413 and err["code"] == "request_too_large"
    assert healthy(srv)


def test_headers_that_trickle_in_past_the_timeout_get_a_408(srv):
    sock = connect(srv)
    started = time.monotonic()
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        closed_at = None
        for _ in range(20):  # a header line every 0.2 s, never the end of the head
            time.sleep(0.2)
            try:
                sock.sendall(b"X-Slow: 1\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
        status, err = error_of(read_all(sock))
        closed_at = time.monotonic() - started
    finally:
        sock.close()
    assert status == 408 and err["code"] == "header_timeout"
    assert HEADER_TIMEOUT - TIMER_SLACK <= closed_at < HEADER_TIMEOUT + 3
    assert healthy(srv)


def test_a_connection_that_sends_nothing_is_closed(srv):
    started = time.monotonic()  # (the server's clock starts when it accepts: maybe before connect returns)
    sock = connect(srv)
    try:
        assert read_all(sock) == b""
    finally:
        sock.close()
    assert HEADER_TIMEOUT - TIMER_SLACK <= time.monotonic() - started < HEADER_TIMEOUT + 3


def test_an_idle_keep_alive_connection_keeps_uvicorns_longer_timeout(srv):
    sock = connect(srv)
    try:
        sock.sendall(chat_request())
        first = read_response(sock)
        assert first.startswith(b"HTTP/1.1 200"), first[:200]
        time.sleep(HEADER_TIMEOUT * 2)  # idle between requests: not a slow head
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        second = read_response(sock)
    finally:
        sock.close()
    assert second.startswith(b"HTTP/1.1 200"), second[:200]


def test_a_slow_body_is_the_body_timeouts_business_not_the_heads(srv):
    """Headers complete in time, then a body that takes longer than the head timeout to
    arrive (under the body read timeout between its parts) is served."""
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
    sock = connect(srv)
    try:
        request = chat_request(body=body)
        head_end = request.index(b"\r\n\r\n") + 4
        sock.sendall(request[:head_end])
        for i in range(head_end, len(request), 8):
            time.sleep(HEADER_TIMEOUT * 2 / (len(body) / 8))
            sock.sendall(request[i:i + 8])
        answer = sock.recv(65536)
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


@pytest.mark.parametrize("raw", [
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n",
    b"G@T /health HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
])
def test_bytes_that_are_not_http_get_a_json_400(srv, raw):
    status, err = refusal_of(srv, raw)
    assert status == 400 and err["code"] == "invalid_http"
    assert healthy(srv)


def test_stray_bytes_after_an_answer_do_not_keep_a_connection_open(srv):
    """Any bytes cancel uvicorn's keep-alive timer; a line end that begins no request must
    not leave the connection without one."""
    sock = connect(srv)
    started = time.monotonic()
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        sock.sendall(b"\r\n")
        assert read_all(sock) == b""  # closed by the server
    finally:
        sock.close()
    assert time.monotonic() - started < HEADER_TIMEOUT + 3


def test_a_body_trickling_after_its_answer_does_not_keep_a_connection_open(srv):
    sock = connect(srv)
    started = time.monotonic()
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for _ in range(100):
                sock.sendall(b"x" * 10)
                time.sleep(0.1)
    finally:
        sock.close()
    assert time.monotonic() - started < HEADER_TIMEOUT + 5


def test_endless_chunked_trailers_are_cut_off(srv):
    sock = connect(srv)
    try:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-Trailer: ")
        sent = 0
        while sent < 50 * MAX_HEADER_BYTES and not select.select([sock], [], [], 0)[0]:
            sock.sendall(b"a" * 4096)
            sent += 4096
            time.sleep(0.001)
        answer = read_all(sock)  # the answer, then the server's end of the connection
    finally:
        sock.close()
    assert sent < 50 * MAX_HEADER_BYTES  # cut off
    status, err = error_of(answer)
    assert status == 431 and err["code"] == "headers_too_large"
    assert healthy(srv)


@pytest.mark.parametrize("body", [
    b"ffffffffffffffffffffffff\r\n{}\r\n0\r\n\r\n",  # a size that overflows
    b"-2\r\n{}\r\n0\r\n\r\n",  # negative
    b"2g\r\n{}\r\n0\r\n\r\n",  # not hex
    b"1\r\n{}\r\n0\r\n\r\n",  # more data than its size says
    b"2\r\n{}\r\n0\r\nContent-Length: 5\r\n\r\n",  # a framing header as a trailer
])
def test_a_chunked_body_that_breaks_its_framing_gets_a_json_400(srv, body):
    """The connection closed without a word (curl: "Empty reply from server"), and the log
    blamed the client for leaving."""
    sock = connect(srv)
    try:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" + body)
        status, err = error_of(read_all(sock))
    finally:
        sock.close()
    assert status == 400 and err["code"] == "invalid_http"
    assert healthy(srv)


def test_a_request_followed_by_bytes_that_are_not_http_is_answered_first(srv):
    """A whole request, then garbage in the same write: the request's answer, then the
    400, then the close (the request was aborted and nothing came back)."""
    sock = connect(srv)
    try:
        sock.sendall(chat_request() + b"GARBAGE\r\n\r\n")
        received = read_all(sock)
    finally:
        sock.close()
    assert received.startswith(b"HTTP/1.1 200"), received[:300]
    first = read_response_from(received)
    status, err = error_of(received[len(first):])
    assert status == 400 and err["code"] == "invalid_http"
    assert json.loads(first.partition(b"\r\n\r\n")[2])["object"] == "chat.completion"
    assert healthy(srv)


def test_an_answer_before_a_body_held_back_for_100_continue_ends_the_connection(srv):
    """A client that sent `Expect: 100-continue` and got a refusal before the server asked for
    the body may reuse the connection without sending it: its next request was read as the
    body, and hung. The refusal now ends the connection; a request whose body was asked for
    keeps it."""
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n")
    sock = connect(srv)
    try:
        sock.sendall(head + b"Content-Type: text/plain\r\n\r\n")
        refused = read_all(sock)  # the answer, then the server's close
    finally:
        sock.close()
    assert refused.startswith(b"HTTP/1.1 415") and b"100 Continue" not in refused
    assert b"connection: close" in refused.lower()
    sock = connect(srv)
    try:
        sock.sendall(head + b"Content-Type: application/json\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        answer = read_response(sock)
        assert answer.startswith(b"HTTP/1.1 200") and b"connection: close" not in answer.lower()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # the connection goes on
        assert read_response(sock).startswith(b"HTTP/1.1 200")
    finally:
        sock.close()


def read_response_from(data: bytes) -> bytes:
    """The first whole response (with a Content-Length) in `data`."""
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1))
    return head + b"\r\n\r\n" + rest[:length]


@pytest.mark.parametrize("connection", ["", "Connection: keep-alive\r\n"])
def test_a_stream_to_an_http10_client_is_not_chunked(srv, connection):
    """HTTP/1.0 has no chunked encoding (RFC 9112 6.1): a stream goes out as it is and ends
    with the connection. A response with a length keeps it."""
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
    with connect(srv) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + connection.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head, _, rest = read_all(sock).partition(b"\r\n\r\n")
    headers = head.lower().split(b"\r\n")
    assert headers[0].startswith(b"http/1.1 200") and b"connection: close" in headers
    assert not any(h.startswith(b"transfer-encoding") for h in headers)
    events = [line for line in rest.split(b"\n") if line]
    assert all(line.startswith(b"data: ") for line in events), rest[:200]
    assert events[-1] == b"data: [DONE]" and json.loads(events[0][6:])["object"] == "chat.completion.chunk"
    plain = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    with connect(srv) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(plain)}\r\n\r\n".encode() + plain)
        head, _, rest = read_all(sock).partition(b"\r\n\r\n")
    assert f"content-length: {len(rest)}".encode() in head.lower().split(b"\r\n")
    assert json.loads(rest)["object"] == "chat.completion"
    with httpx.stream("POST", srv.base_url + "/v1/chat/completions", json={**json.loads(body)}) as r:
        assert r.headers["transfer-encoding"] == "chunked"  # (HTTP/1.1: unchanged)


@pytest.mark.parametrize("hosts", [b"", b"Host: a\r\nHost: b\r\n"])
def test_an_http11_request_without_exactly_one_host_is_a_400(srv, hosts):
    """RFC 9112 3.2: a proxy or cache in front may have read another Host than ours."""
    with connect(srv) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\n" + hosts + b"\r\n")
        head, _, body = read_all(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"connection: close" in head.lower()
    assert "Host" in json.loads(body)["error"]["message"]


@pytest.mark.parametrize("whole", [True, False])
def test_a_request_target_over_the_limit_gets_a_414(srv, whole):
    """The target alone over the limit is a URI too long (RFC 9110 15.5.15), whether it
    arrives in one read or trickles in."""
    target = b"/v1/models?" + b"q" * (MAX_HEADER_BYTES + 10)
    with connect(srv) as sock:
        try:
            if whole:
                sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            else:
                for at in range(0, len(target), 4096):
                    sock.sendall((b"GET " if at == 0 else b"") + target[at : at + 4096])
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, err = error_of(read_all(sock))
    assert status == 414 and err["code"] == "uri_too_long", err
    assert healthy(srv)


def _errors_counted(srv, code: str) -> float:
    text = httpx.get(srv.base_url + "/metrics", timeout=5).text
    m = re.search(rf'(?m)^qwenvl_errors_total\{{code="{code}"\}} (\S+)$', text)
    return float(m.group(1)) if m else 0.0


@pytest.mark.parametrize("raw, code", [
    (b"GARBAGE\r\n\r\n", "invalid_http"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 10) + b"\r\n\r\n",
     "headers_too_large"),
    (b"GET /" + b"a" * (MAX_HEADER_BYTES + 10) + b" HTTP/1.1\r\nHost: x\r\n\r\n", "uri_too_long"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\n", "header_timeout"),
])
def test_the_protocols_own_refusals_are_counted_as_errors(srv, raw, code):
    """Alerts on the error counter see header floods, slow heads and garbage too, not only
    what reached the app."""
    before = _errors_counted(srv, code)
    _, err = refusal_of(srv, raw)
    assert err["code"] == code
    assert _errors_counted(srv, code) == before + 1
