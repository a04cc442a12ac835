"""The bound on request-body bytes held over all requests at once (`--max-body-bytes-held`,
server.admission.BodyBudget): raw sockets and httpx against the real HTTP stack, scripted
engine."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.engine.base import ModelInfo
from server.engine.scripted import ScriptedEngine
from server.settings import Settings
from support.app_server import scripted_server

MAX_REQUEST = 1024 * 1024
BUDGET = 1536 * 1024


def padded_body(size: int, stream: bool = False) -> bytes:
    """A valid chat request of exactly `size` bytes (JSON allows the trailing blanks)."""
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "stream": stream}).encode()
    return body + b" " * (size - len(body))


@pytest.fixture(scope="module")
def srv(tiny_tokenizer):
    engine = ScriptedEngine(ModelInfo(family="qwen2-vl", max_model_len=4096, tokenizer=tiny_tokenizer), delay=0.0)
    with scripted_server(tiny_tokenizer, engine=engine, max_request_bytes=MAX_REQUEST,
                         max_body_bytes_held=BUDGET) as server:
        # every byte counted (the free first MiB of each body is tested on its own below)
        server.runtime.body_budget.allowance = 0
        yield server


def held(srv) -> int:
    return srv.runtime.body_budget.held


def wait_until(check, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def metric(srv, name: str, labels: dict[str, str] | None = None) -> float:
    text = httpx.get(srv.base_url + "/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (labels is None or all(sample.labels.get(k) == v for k, v in labels.items())):
                return sample.value
    return 0.0


def post(srv, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(srv.base_url + "/v1/chat/completions", content=body,
                      headers={"content-type": "application/json", **headers}, timeout=30)


def read_response(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


class PartialUpload:
    """A request whose body is sent in part, the rest held back until `finish()`."""

    def __init__(self, srv, body: bytes, sent: int) -> None:
        self.body, self.sent = body, sent
        self.sock = socket.create_connection((srv.host, srv.port), timeout=30)
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        self.sock.sendall(head + body[:sent])

    def finish(self) -> bytes:
        self.sock.sendall(self.body[self.sent:])
        try:
            return read_response(self.sock)
        finally:
            self.sock.close()


def test_bodies_count_as_they_arrive_and_one_that_does_not_fit_gets_a_429(srv):
    refused_before = metric(srv, "qwenvl_admission_refused_total", {"reason": "body_budget"})
    upload = PartialUpload(srv, padded_body(1_000_000), sent=900_000)
    wait_until(lambda: held(srv) == 900_000)  # what arrived, not the 1,000,000 declared
    assert metric(srv, "qwenvl_request_body_bytes_held") == 900_000

    refused = post(srv, padded_body(700_000))
    assert refused.status_code == 429
    err = refused.json()["error"]
    assert err["type"] == "rate_limit_error" and err["code"] == "server_overloaded"
    assert "request bodies" in err["message"] and "retry" in err["message"]
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["connection"] == "close"
    assert metric(srv, "qwenvl_admission_refused_total", {"reason": "body_budget"}) == refused_before + 1
    assert held(srv) == 900_000  # the refused request's share went back

    # 900,000 + 600,000 fits under 1.5 MiB (the declared lengths, 1,600,000, would not)
    assert post(srv, padded_body(600_000)).status_code == 200

    answer = upload.finish()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    wait_until(lambda: held(srv) == 0)
    assert post(srv, padded_body(700_000)).status_code == 200  # the refused one, retried
    assert held(srv) == 0


def test_a_chunked_body_that_does_not_fit_gets_a_429(srv):
    upload = PartialUpload(srv, padded_body(1_000_000), sent=1_000_000 - 10)
    wait_until(lambda: held(srv) == 1_000_000 - 10)
    try:
        body = padded_body(700_000)
        chunks = [body[i:i + 100_000] for i in range(0, len(body), 100_000)]
        refused = httpx.post(srv.base_url + "/v1/chat/completions", content=iter(chunks),
                             headers={"content-type": "application/json"}, timeout=30)
        assert "content-length" not in refused.request.headers  # (sent chunked)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "server_overloaded"
        assert held(srv) == 1_000_000 - 10
    finally:
        assert upload.finish().startswith(b"HTTP/1.1 200")
    wait_until(lambda: held(srv) == 0)


def test_a_streamed_answer_holds_no_share_while_it_is_generated(srv):
    srv.engine.delay = 0.1
    srv.engine.enqueue("one two three four five six seven eight nine ten")  # 17 pieces, 1.7 s
    try:
        with httpx.stream("POST", srv.base_url + "/v1/chat/completions", content=padded_body(900_000, stream=True),
                          headers={"content-type": "application/json"}, timeout=30) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first.removeprefix("data: "))["object"] == "chat.completion.chunk"
            assert held(srv) == 0, held(srv)  # the answer is still coming; the body's share is back
            assert post(srv, padded_body(MAX_REQUEST)).status_code == 200  # a whole budget's worth fits
            assert [line for line in lines if line.startswith("data: ")][-1] == "data: [DONE]"
    finally:
        srv.engine.delay = 0.0


def test_refused_and_failed_requests_give_their_share_back(srv):
    assert post(srv, b"{" + b" " * 500_000).status_code == 400  # not JSON
    assert post(srv, padded_body(MAX_REQUEST + 1)).status_code == 413
    bad_model = json.dumps({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}).encode()
    assert post(srv, bad_model + b" " * 500_000).status_code == 404
    # a client that leaves mid-upload
    sock = socket.create_connection((srv.host, srv.port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 900000\r\n\r\n" + b" " * 400_000)
    wait_until(lambda: held(srv) == 400_000)
    sock.close()
    wait_until(lambda: held(srv) == 0)


def test_small_bodies_pass_while_large_ones_hold_the_budget(srv):
    """The first part of every body is free: clients holding the budget with large bodies
    sent slowly shut out only other large bodies, not everyone's ordinary requests."""
    srv.runtime.body_budget.allowance = 100_000
    try:
        uploads = [PartialUpload(srv, padded_body(1_000_000), sent=950_000)]
        wait_until(lambda: held(srv) == 850_000)  # (its first 100,000 bytes free)
        uploads.append(PartialUpload(srv, padded_body(1_000_000), sent=820_000))
        wait_until(lambda: held(srv) == 1_570_000)  # 2,864 bytes short of the budget
        assert post(srv, padded_body(100_000)).status_code == 200
        assert post(srv, padded_body(105_000)).status_code == 429  # 5,000 bytes beyond the free part
        assert held(srv) == 1_570_000
        for upload in uploads:
            upload.sock.close()
        wait_until(lambda: held(srv) == 0)
        assert post(srv, padded_body(600_000)).status_code == 200
    finally:
        srv.runtime.body_budget.allowance = 0


def test_a_budget_below_the_largest_body_is_refused_at_start():
    with pytest.raises(ValueError, match="--max-body-bytes-held"):
        Settings(max_request_bytes=2_000_000, max_body_bytes_held=1_000_000)
