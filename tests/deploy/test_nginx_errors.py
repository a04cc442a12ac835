"""The errors nginx answers itself (deploy/nginx/qwen-vl-serve.conf) reach clients as
OpenAI-style JSON, as a replica's own errors do, so that the openai SDK can read them.

Real nginx with the shipped configuration in front of a replica address where nothing
listens (these answers never involve a replica; tests/deploy/test_nginx.py covers the
replicas' own errors passing through).
"""

from __future__ import annotations

import socket

import httpx
import openai
import pytest

MAX_BODY = 64 * 1024 * 1024  # client_max_body_size in the shipped configuration


def sdk(nginx) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{nginx.url}/v1", api_key="unused", max_retries=0, timeout=60)


def assert_json_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text[:300]
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"]
    assert response.headers.get("x-request-id")
    return error


def test_body_over_the_limit_is_a_json_413_the_sdk_reads(lonely_nginx):
    with pytest.raises(openai.APIStatusError) as info:
        sdk(lonely_nginx).chat.completions.create(
            model="tiny", max_tokens=1,
            messages=[{"role": "user", "content": "x" * (MAX_BODY + 1024)}])
    err = info.value
    assert err.status_code == 413
    assert err.body["code"] == "request_too_large"
    assert "64 MiB" in err.message
    assert_json_error(err.response, 413, "request_too_large")


def test_no_replica_reachable_is_a_json_502(lonely_nginx):
    response = httpx.post(f"{lonely_nginx.url}/v1/chat/completions", timeout=30,
                          headers={"X-Request-Id": "no-replica-1"},
                          json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    error = assert_json_error(response, 502, "no_replica_available")
    assert "retry" in error["message"]
    assert response.headers["x-request-id"] == "no-replica-1"
    # What the SDK makes of it (its retries off): a server error carrying the message.
    with pytest.raises(openai.InternalServerError) as info:
        sdk(lonely_nginx).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 502 and info.value.body["code"] == "no_replica_available"


def test_oversized_header_is_a_json_400(lonely_nginx):
    # One header line over nginx's large_client_header_buffers (64 KiB, the replicas' own limit).
    response = httpx.get(f"{lonely_nginx.url}/v1/models", headers={"X-Big": "a" * 70_000}, timeout=30)
    assert_json_error(response, 400, "bad_request")


def test_malformed_request_line_is_a_json_400(lonely_nginx):
    with socket.create_connection(("127.0.0.1", lonely_nginx.port), timeout=10) as s:
        s.sendall(b"GET /v1/models HTTP/1.1 extra\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), head[:200]
    assert b"application/json" in head
    assert b'"code":"bad_request"' in body


def test_metrics_are_not_served_through_the_balancer_and_the_404_is_json(lonely_nginx):
    response = httpx.get(f"{lonely_nginx.url}/metrics", timeout=30)
    assert_json_error(response, 404, "not_found")


@pytest.mark.parametrize(("raw", "status", "code"), [
    (b"TRACE /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 405, "method_not_allowed"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
     501, "not_implemented"),
    (b"GET /v1/models HTTP/2.5\r\nHost: x\r\n\r\n", 505, "http_version_not_supported"),
])
def test_refusals_of_methods_codings_and_versions_are_json_too(lonely_nginx, raw, status, code):
    """They were nginx's HTML pages, which also named its version."""
    with socket.create_connection(("127.0.0.1", lonely_nginx.port), timeout=10) as s:
        s.sendall(raw)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d" % status), head[:200]
    assert b"application/json" in head and f'"code":"{code}"'.encode() in body
    assert b"nginx/" not in data


def test_no_answer_names_the_nginx_version(lonely_nginx):
    response = httpx.get(f"{lonely_nginx.url}/v1/models", timeout=30)
    assert response.headers.get("server") == "nginx"
