"""Serving under load, faults and hostile clients, on the real HTTP stack with a scripted
engine (fast): backpressure, auth, limits, deadlines, streaming details, disconnects."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import re
import select
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from server.app import create_app
from server.engine.base import LARGE_DELTA_TOKENS, ChoiceDelta, GenerationChunk, ModelInfo, TokenLogprob
from server.engine.scripted import ScriptedEngine
from server.settings import Settings
from support.app_server import AppServer, scripted_app, scripted_server
from support.http_server import start_server, static
from support.images import data_url, picture

IMAGE_HOST = "127.0.0.2"


def chat(base_url: str, content="hi", headers=None, timeout=30, **body):
    payload = {"messages": [{"role": "user", "content": content}], **body}
    return httpx.post(base_url + "/v1/chat/completions", json=payload, headers=headers or {}, timeout=timeout)


def sse_lines(base_url: str, timeout=30, **body):
    payload = {"messages": [{"role": "user", "content": "hi"}], "stream": True, **body}
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=payload, timeout=timeout) as r:
        assert r.status_code == 200
        return [line for line in r.iter_lines() if line]


def logged(caplog, match, timeout: float = 5) -> bool:
    """Whether a log message matching `match` appears within `timeout` seconds (the access log
    line is written after the response's last byte, so a client can see the answer first)."""
    deadline = time.monotonic() + timeout
    while not any(match(rec.getMessage()) for rec in list(caplog.records)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture(scope="module")
def image_server():
    state, httpd = start_server(IMAGE_HOST)
    state.routes["/a.png"] = static(picture(32, 32), "image/png")
    yield state
    httpd.shutdown()
    httpd.server_close()


def slow_engine(tokenizer, delay: float, reply: str = "abcdefghijkl") -> ScriptedEngine:
    return ScriptedEngine(ModelInfo(family="qwen2-vl", max_model_len=4096, tokenizer=tokenizer),
                          default_reply=reply, chunk_chars=1, delay=delay)


def test_backpressure_refuses_fast_before_fetching_images(tiny_tokenizer, image_server):
    engine = slow_engine(tiny_tokenizer, delay=0.3)  # 12 chunks: ~3.6 s per request
    app, _ = scripted_app(tiny_tokenizer, engine=engine, max_concurrent_requests=1, max_queued_requests=1,
                          image_allow_networks=[f"{IMAGE_HOST}/32"], image_cache_size=0)
    url = image_server.url("/a.png")
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "x"}]
    with AppServer(app) as srv:
        before = len(image_server.requests)
        with ThreadPoolExecutor(6) as pool:
            futures = []
            for _ in range(6):
                futures.append(pool.submit(chat, srv.base_url, content))
                time.sleep(0.05)
            results = [f.result() for f in futures]
        codes = sorted(r.status_code for r in results)
        assert codes == [200, 200, 429, 429, 429, 429], codes
        refused = [r for r in results if r.status_code == 429]
        for r in refused:
            assert r.headers["retry-after"].isdigit()
            assert r.json()["error"]["type"] == "rate_limit_error"
            assert r.elapsed.total_seconds() < 1.5  # refused at once, not after queueing (3.6 s)
        # Only admitted requests fetched their image.
        assert len(image_server.requests) - before == 2
        metrics = httpx.get(srv.base_url + "/metrics").text
        assert 'qwenvl_admission_refused_total{reason="queue_full"} 4.0' in metrics
        assert "qwenvl_admission_admitted_total 2.0" in metrics
        # no `*_created` timestamp series beside the counters and histograms
        assert not [line for line in metrics.splitlines() if "_created" in line.split(" ")[0]], metrics


def test_api_keys(tiny_tokenizer, tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("# team keys\nfile-key\n\n")
    app, _ = scripted_app(tiny_tokenizer, api_keys=["k1", "k2"], api_key_file=key_file)
    with AppServer(app) as srv:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic k1"}, {"Authorization": "Bearer k1x"}):
            r = chat(srv.base_url, headers=headers)
            assert r.status_code == 401
            assert r.json()["error"]["type"] == "authentication_error"
            assert "k1" not in r.text
            # written as the app's own error bodies are (a 404 here, say): compact JSON
            assert r.content == json.dumps(r.json(), separators=(",", ":"), ensure_ascii=False).encode()
        for key in ("k1", "k2", "file-key"):
            assert chat(srv.base_url, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="k2", max_retries=0)
        assert client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "x"}]).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.base_url + "/v1", api_key="bad", max_retries=0).models.list()
        # Probes stay open; metrics need a key.
        assert httpx.get(srv.base_url + "/health").status_code == 200
        assert httpx.get(srv.base_url + "/ready").status_code == 200
        assert httpx.get(srv.base_url + "/metrics").status_code == 401
        assert httpx.get(srv.base_url + "/metrics", headers={"Authorization": "Bearer k1"}).status_code == 200
        # The docs and the schema are behind the key too.
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert httpx.get(srv.base_url + path).status_code == 401
        assert httpx.get(srv.base_url + "/openapi.json", headers={"Authorization": "Bearer k1"}).status_code == 200
        # Two keys in one request: the first one won (a proxy in front may have checked the other).
        for pair in ([("Authorization", "Bearer k1"), ("Authorization", "Bearer wrong")],
                     [("Authorization", "Bearer wrong"), ("Authorization", "Bearer k1")]):
            assert chat(srv.base_url, headers=httpx.Headers(pair)).status_code == 401


def test_an_encoded_slash_in_a_path_is_not_routed(tiny_tokenizer):
    """/v1/chat%2Fcompletions reached the chat endpoint (routing decodes the path), past a proxy
    in front that filters on the path as sent."""
    app, _ = scripted_app(tiny_tokenizer)
    with AppServer(app) as srv:
        body = {"messages": [{"role": "user", "content": "hi"}]}
        for path in ("/v1/chat%2Fcompletions", "/v1%2fchat/completions"):
            r = httpx.post(srv.base_url + path, json=body)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path
            assert "%2F" in r.json()["error"]["message"]
        assert httpx.post(srv.base_url + "/v1/chat/completions", json=body).status_code == 200


def test_a_model_id_with_a_slash_is_found_as_the_sdk_sends_it(tiny_tokenizer):
    """The SDK percent-encodes the id's slash (GET /v1/models/Qwen%2FQwen2-VL-7B-Instruct);
    a served name is often a hub id or a path."""
    app, _ = scripted_app(tiny_tokenizer, served_model_name="Qwen/Qwen2-VL-7B-Instruct")
    with AppServer(app) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        assert client.models.retrieve("Qwen/Qwen2-VL-7B-Instruct").id == "Qwen/Qwen2-VL-7B-Instruct"
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("Qwen/other")


def test_docs_can_be_turned_off(tiny_tokenizer):
    app, _ = scripted_app(tiny_tokenizer, docs=False)
    with AppServer(app) as srv:
        for path in ("/docs", "/redoc", "/openapi.json"):
            r = httpx.get(srv.base_url + path)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert chat(srv.base_url).status_code == 200


def test_a_wrong_method_gets_a_405_naming_the_allowed_ones(tiny_tokenizer):
    app, _ = scripted_app(tiny_tokenizer)
    with AppServer(app) as srv:
        for path, allowed in (("/health", {"GET", "HEAD"}), ("/ready", {"GET", "HEAD"}),
                              ("/v1/chat/completions", {"POST"}), ("/v1/models", {"GET", "HEAD"}),
                              ("/v1/models/scripted", {"GET", "HEAD"}), ("/metrics", {"GET", "HEAD"})):
            method = "PUT" if "POST" in allowed else "POST"
            r = httpx.request(method, srv.base_url + path)
            assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed", path
            assert {m.strip() for m in r.headers["allow"].split(",")} == allowed, path
        # every GET answers HEAD (RFC 9110 9.1): GET's status and headers, no body
        for path in ("/health", "/ready", "/v1/models", "/v1/models/scripted", "/metrics"):
            r = httpx.head(srv.base_url + path)
            assert r.status_code == 200 and r.content == b"", path
            got = httpx.get(srv.base_url + path)
            assert r.headers["content-type"] == got.headers["content-type"], path
        assert httpx.head(srv.base_url + "/v1/models/other").status_code == 404


def test_time_per_output_token_is_per_choice_with_n_choices(tiny_tokenizer):
    """n choices advance one token each per step: the metric is the time between a choice's
    tokens (at least the scripted engine's 0.1 s delay), not that divided by n."""
    engine = slow_engine(tiny_tokenizer, delay=0.1, reply="abcdef")  # 6 steps of one token each
    app, _ = scripted_app(tiny_tokenizer, engine=engine)
    with AppServer(app) as srv:
        assert chat(srv.base_url, n=4, temperature=1).status_code == 200
        metrics = httpx.get(srv.base_url + "/metrics").text
        total = float(re.search(r"^qwenvl_time_per_output_token_seconds_sum (\S+)$", metrics, re.M).group(1))
        count = float(re.search(r"^qwenvl_time_per_output_token_seconds_count (\S+)$", metrics, re.M).group(1))
        assert count == 1 and total >= 0.09, total


def test_api_keys_configurable_paths(tiny_tokenizer):
    app, _ = scripted_app(tiny_tokenizer, api_keys=["k"], auth_health_endpoints=True, auth_metrics=False)
    with AppServer(app) as srv:
        assert httpx.get(srv.base_url + "/health").status_code == 401
        assert httpx.get(srv.base_url + "/ready", headers={"Authorization": "Bearer k"}).status_code == 200
        assert httpx.get(srv.base_url + "/metrics").status_code == 200


def test_request_limits(tiny_tokenizer):
    app, _ = scripted_app(tiny_tokenizer, max_request_bytes=20_000, max_messages=3, max_n=2)
    with AppServer(app) as srv:
        big = chat(srv.base_url, content="x" * 30_000)
        assert big.status_code == 413 and "20000" in big.json()["error"]["message"]
        # A chunked body without Content-Length is capped while it streams in.
        def gen():
            for _ in range(40):
                yield b" " * 1000
        r = httpx.post(srv.base_url + "/v1/chat/completions", content=gen(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        msgs = [{"role": "user", "content": "a"}] * 4
        r = httpx.post(srv.base_url + "/v1/chat/completions", json={"messages": msgs})
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_messages"
        r = chat(srv.base_url, n=3)
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        assert chat(srv.base_url).status_code == 200


def test_deadline(tiny_tokenizer):
    engine = slow_engine(tiny_tokenizer, delay=0.2)
    app, _ = scripted_app(tiny_tokenizer, engine=engine, request_timeout=0.6)
    with AppServer(app) as srv:
        r = chat(srv.base_url)
        assert r.status_code == 504
        assert "0.6" in r.json()["error"]["message"]
        lines = sse_lines(srv.base_url)
        assert lines[-1] == "data: [DONE]"
        err = json.loads(lines[-2][len("data: "):])
        assert err["error"]["code"] == "request_timeout"
        deadline = time.monotonic() + 5  # (the engine request is closed a beat after the answer)
        while engine.num_unfinished_requests() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.num_unfinished_requests() == 0


def test_keepalive_comments_while_waiting(tiny_tokenizer):
    engine = slow_engine(tiny_tokenizer, delay=0.5, reply="ab")
    app, _ = scripted_app(tiny_tokenizer, engine=engine, sse_keepalive_interval=0.15)
    with AppServer(app) as srv:
        lines = sse_lines(srv.base_url)
        assert any(line.startswith(":") for line in lines)
        text = "".join(json.loads(l[6:])["choices"][0]["delta"].get("content", "")
                       for l in lines if l.startswith("data: {") and json.loads(l[6:])["choices"])
        assert text == "ab"


class FailingEngine(ScriptedEngine):
    async def _stream(self, request, reply, n_prompt, cut=None, only=None):
        async for chunk in super()._stream(request, reply, n_prompt, cut, only):
            yield chunk
            raise RuntimeError("secret internal detail at 0xdeadbeef")


class SilentlyDeadEngine(ScriptedEngine):
    """Reports itself dead but leaves its open streams hanging (vLLM can take seconds to fail
    them while it tears its processes down)."""

    died = False

    @property
    def is_dead(self) -> bool:
        return self.died


def test_a_client_that_leaves_the_queue_frees_its_place(tiny_tokenizer):
    engine = slow_engine(tiny_tokenizer, delay=0.5)  # 12 chunks: ~6 s in the one slot
    app, _ = scripted_app(tiny_tokenizer, engine=engine, max_concurrent_requests=1, max_queued_requests=1)
    with AppServer(app) as srv, ThreadPoolExecutor(1) as pool:
        busy = pool.submit(chat, srv.base_url)
        deadline = time.monotonic() + 5
        while srv.runtime.admission.active < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(httpx.ReadTimeout):
            chat(srv.base_url, timeout=0.5)  # queued behind it, then gives up
        deadline = time.monotonic() + 2
        while srv.runtime.admission.queued and time.monotonic() < deadline:
            time.sleep(0.02)
        assert srv.runtime.admission.queued == 0  # its place is free while the slot is still busy
        assert not busy.done()
        # so the next client queues (rather than a 429) and is served after the first
        assert chat(srv.base_url, timeout=30).status_code == 200
        assert busy.result().status_code == 200
        metrics = httpx.get(srv.base_url + "/metrics").text
        assert 'qwenvl_requests_total{outcome="cancelled"} 1.0' in metrics
        assert "qwenvl_admission_admitted_total 2.0" in metrics


def test_the_sdk_does_not_retry_a_request_that_ran_out_of_time(tiny_tokenizer):
    """The official SDK retries a 504 twice unless told not to: each retry would run the
    whole deadline again."""
    engine = slow_engine(tiny_tokenizer, delay=0.2)
    app, _ = scripted_app(tiny_tokenizer, engine=engine, request_timeout=0.6)
    with AppServer(app) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=2)
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "hi"}])
        assert info.value.status_code == 504 and info.value.code == "request_timeout"
        assert info.value.response.headers["x-should-retry"] == "false"
        metrics = httpx.get(srv.base_url + "/metrics").text
        assert "qwenvl_admission_admitted_total 1.0" in metrics  # one attempt, no retries


def test_the_deadline_counts_the_time_in_the_queue(tiny_tokenizer):
    app, _ = scripted_app(tiny_tokenizer, max_concurrent_requests=1, max_queued_requests=1, request_timeout=1.0)
    with AppServer(app) as srv:
        release = srv.call(srv.runtime.admission.acquire())  # the one slot, held by the test
        try:
            waiting = chat(srv.base_url, timeout=30)
            # it never got the slot: its deadline ran out in the queue, and its place is free
            assert waiting.status_code == 504
            assert "processing slot" in waiting.json()["error"]["message"]
            assert srv.runtime.admission.queued == 0
        finally:
            async def give_back():
                release()
            srv.call(give_back())
        assert chat(srv.base_url).status_code == 200


@pytest.mark.parametrize("framing", [
    b"Content-Length: 1000\r\n\r\n{\"messages\"",  # fewer bytes than declared
    b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"mes\r\n",  # a chunk, then nothing
], ids=["content-length", "chunked"])
def test_a_body_that_stops_arriving_gets_a_408_and_the_connection_closes(tiny_tokenizer, framing):
    app, _ = scripted_app(tiny_tokenizer, body_read_timeout=0.5)
    with AppServer(app) as srv:
        sock = socket.create_connection((srv.host, srv.port))
        sock.settimeout(10)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + framing)
        data = b""
        while chunk := sock.recv(65536):  # until the server closes the connection
            data += chunk
        sock.close()
        head, _, payload = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), head
        assert json.loads(payload)["error"]["code"] == "body_timeout"
        assert chat(srv.base_url).status_code == 200


def test_a_body_that_drips_in_gets_a_408_when_the_whole_body_is_late(tiny_tokenizer):
    """Every part arrives within the read timeout, but the whole body takes longer than
    --body-timeout: a client sending a byte now and then no longer holds its connection."""
    app, _ = scripted_app(tiny_tokenizer, body_read_timeout=0.5, body_timeout=1.5)
    with AppServer(app) as srv:
        sock = socket.create_connection((srv.host, srv.port))
        sock.settimeout(10)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{")
        started, data = time.monotonic(), b""
        try:
            for _ in range(20):  # a byte every 0.3 s, for up to 6 s, until the server answers
                if select.select([sock], [], [], 0.3)[0]:
                    break
                sock.sendall(b" ")
        except OSError:  # (the server closed the connection)
            pass
        while chunk := sock.recv(65536):
            data += chunk
        sock.close()
        elapsed = time.monotonic() - started
        head, _, payload = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), head
        assert json.loads(payload)["error"]["code"] == "body_timeout"
        assert 1.3 < elapsed < 4, elapsed
        assert chat(srv.base_url).status_code == 200


def test_the_body_timeout_does_not_cut_a_long_response(tiny_tokenizer):
    engine = slow_engine(tiny_tokenizer, delay=0.15)  # 12 chunks: ~1.8 s
    app, _ = scripted_app(tiny_tokenizer, engine=engine, body_read_timeout=0.5)
    with AppServer(app) as srv:
        lines = sse_lines(srv.base_url)
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]) == "abcdefghijkl"
        assert chat(srv.base_url).json()["choices"][0]["message"]["content"] == "abcdefghijkl"


def test_a_request_that_meets_the_engine_dying_gets_a_503_not_a_500(tiny_tokenizer):
    """The engine refuses a new request as dead before the watcher (every 0.5 s) has marked
    the server so: the request got a 500 internal_error and a traceback in the log."""
    engine = SilentlyDeadEngine(ModelInfo(family="qwen2-vl", max_model_len=4096, tokenizer=tiny_tokenizer))
    engine.dead = True  # start() raises EngineDeadError; is_dead still says alive
    app = create_app(Settings(served_model_name="scripted"), engine=engine, model_names=["scripted"],
                     on_fatal=lambda code: None)
    with AppServer(app) as srv:
        for stream in (False, True):
            r = chat(srv.base_url, stream=stream)
            assert r.status_code == 503, r.text
            err = r.json()["error"]
            assert err["code"] == "service_unavailable" and "engine" in err["message"]
            assert r.headers["retry-after"] == "1"


def test_a_dead_engine_ends_open_requests_cleanly_and_the_process_exits(tiny_tokenizer):
    engine = SilentlyDeadEngine(ModelInfo(family="qwen2-vl", max_model_len=4096, tokenizer=tiny_tokenizer),
                                default_reply="x" * 1000, chunk_chars=1, delay=0.05)
    fatal: list[int] = []
    settings = Settings(served_model_name="scripted")
    app = create_app(settings, engine=engine, model_names=["scripted"], on_fatal=fatal.append)
    with AppServer(app) as srv:
        results: dict = {}

        def stream():
            results["stream"] = sse_lines(srv.base_url, stream=True)

        def plain():
            results["plain"] = chat(srv.base_url)

        threads = [threading.Thread(target=stream), threading.Thread(target=plain)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while srv.runtime.admission.active < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        engine.died = True
        for t in threads:
            t.join(15)
        lines = results["stream"]
        assert lines[-1] == "data: [DONE]"
        err = json.loads(lines[-2][6:])["error"]
        assert err["code"] == "service_unavailable" and "engine" in err["message"]
        assert results["plain"].status_code == 503
        assert "engine" in results["plain"].json()["error"]["message"]
        deadline = time.monotonic() + 5
        while not fatal and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fatal == [1]  # the process exits non-zero (the orchestrator restarts it)
        assert httpx.get(srv.base_url + "/health").status_code == 503


class MergedDeltaEngine(ScriptedEngine):
    """Hands a whole answer out as one delta, as vLLM does for a stream whose client fell
    behind (every token made meanwhile merged), each token with its alternatives."""

    tokens = 3 * LARGE_DELTA_TOKENS

    async def _stream(self, request, reply, n_prompt, cut=None, only=None):
        k = request.sampling.logprobs
        logprobs = None if k is None else [
            TokenLogprob(token=f"t{i}", logprob=-0.5, top=[(f"t{i}", -0.5, None)] + [(f"a{j}", -1.0 - j, None)
                                                                                  for j in range(k)])
            for i in range(self.tokens)]
        text = "".join(f"t{i}" for i in range(self.tokens))
        yield GenerationChunk(prompt_tokens=n_prompt, finished=True, choices=[
            ChoiceDelta(index=0, text=text, token_ids=list(range(self.tokens)), logprobs=logprobs,
                        finish_reason="length")])


@pytest.mark.parametrize("stream", [True, False])
def test_a_delta_of_many_tokens_with_logprobs_comes_out_whole(tiny_tokenizer, stream):
    """A delta past LARGE_DELTA_TOKENS is turned into events off the event loop: the same
    events, every token with its alternatives, in order."""
    engine = MergedDeltaEngine(ModelInfo(family="qwen2-vl", max_model_len=8192, tokenizer=tiny_tokenizer))
    app, _ = scripted_app(tiny_tokenizer, engine=engine)
    with AppServer(app) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        ask = dict(model="scripted", messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=3)
        if stream:
            content, logprobs = "", []
            for ch in client.chat.completions.create(stream=True, **ask):
                if ch.choices and ch.choices[0].delta.content:
                    content += ch.choices[0].delta.content
                if ch.choices and ch.choices[0].logprobs and ch.choices[0].logprobs.content:
                    logprobs += ch.choices[0].logprobs.content
        else:
            choice = client.chat.completions.create(**ask).choices[0]
            content, logprobs = choice.message.content, choice.logprobs.content
    n = MergedDeltaEngine.tokens
    assert content == "".join(f"t{i}" for i in range(n))
    assert [lp.token for lp in logprobs] == [f"t{i}" for i in range(n)]
    assert all([t.token for t in lp.top_logprobs] == [lp.token, "a0", "a1"] for lp in logprobs)


@pytest.mark.parametrize("stall_timeout", [1.0, 0.0])
def test_an_engine_that_holds_requests_and_outputs_nothing_is_taken_for_hung(tiny_tokenizer, stall_timeout):
    """A hung engine (a stuck device, a frozen engine process) is not dead: vLLM reports
    nothing wrong. Past --engine-stall-timeout without any output it is treated as dead:
    open requests fail, /health turns 503, the process exits 1. 0 turns that off."""
    engine = ScriptedEngine(ModelInfo(family="qwen2-vl", max_model_len=4096, tokenizer=tiny_tokenizer),
                            default_reply="ab", chunk_chars=1, delay=6.0)  # silent 6 s before each token
    fatal: list[int] = []
    settings = Settings(served_model_name="scripted", engine_stall_timeout=stall_timeout)
    app = create_app(settings, engine=engine, model_names=["scripted"], on_fatal=fatal.append)
    with AppServer(app) as srv:
        started = time.monotonic()
        r = chat(srv.base_url, timeout=20, max_tokens=1)
        took = time.monotonic() - started
        if stall_timeout:
            assert r.status_code == 503 and "engine" in r.json()["error"]["message"]
            assert took < 4  # the stall, not the engine, ended it
            deadline = time.monotonic() + 5
            while not fatal and time.monotonic() < deadline:
                time.sleep(0.05)
            assert fatal == [1]
            assert httpx.get(srv.base_url + "/health").status_code == 503
        else:
            assert r.status_code == 200 and took >= 6
            assert not fatal and httpx.get(srv.base_url + "/health").status_code == 200


def test_an_engine_that_keeps_handing_out_tokens_is_not_taken_for_hung(tiny_tokenizer):
    """Slow but moving: tokens every 0.4 s for 3 s under a 1 s stall limit."""
    engine = ScriptedEngine(ModelInfo(family="qwen2-vl", max_model_len=4096, tokenizer=tiny_tokenizer),
                            default_reply="abcdefgh", chunk_chars=1, delay=0.4)
    fatal: list[int] = []
    settings = Settings(served_model_name="scripted", engine_stall_timeout=1.0)
    app = create_app(settings, engine=engine, model_names=["scripted"], on_fatal=fatal.append)
    with AppServer(app) as srv:
        time.sleep(2)  # idle for longer than the limit first: an idle engine owes no output
        r = chat(srv.base_url, timeout=20)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "abcdefgh"
        assert not fatal and httpx.get(srv.base_url + "/health").status_code == 200


@pytest.mark.parametrize(("reason", "status", "code"), [("error", 500, "generation_failed"),
                                                       ("abort", 503, "generation_aborted")])
def test_an_answer_the_engine_gave_up_on_is_an_error_not_a_stop(tiny_tokenizer, reason, status, code):
    """vLLM ends a request it failed with finish_reason "error" and one it cancelled itself
    (shutdown, paused generation) with "abort": the text so far is not a whole answer."""
    engine = ScriptedEngine(ModelInfo(family="qwen2-vl", max_model_len=4096, tokenizer=tiny_tokenizer))
    app, _ = scripted_app(tiny_tokenizer, engine=engine)
    with AppServer(app) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        messages = [{"role": "user", "content": "hi"}]
        engine.enqueue_cut("half an ans", reason)
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model="scripted", messages=messages)
        assert info.value.status_code == status and info.value.body["code"] == code
        assert "send the request again" in info.value.body["message"]
        engine.enqueue_cut("half an ans", reason)
        stream = client.chat.completions.create(model="scripted", messages=messages, stream=True)
        received = []
        with pytest.raises(openai.APIError) as info:
            for chunk in stream:
                received += [c.delta.content or "" for c in chunk.choices]
                assert all(c.finish_reason is None for c in chunk.choices)  # never a "stop"
        assert "send the request again" in info.value.message
        # the text sent before the engine gave up; an "error" output's own tokens are the ones
        # a grammar refused (vLLM's placeholder), not text
        # (the scripted engine's pieces: "hal", "f a", "n a", "ns")
        assert "".join(received) == ("half an ans" if reason == "abort" else "half an a")
        # the SDK retries these statuses: a retry gets a whole answer
        engine.enqueue_cut("half an ans", reason)
        retrying = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=1)
        answer = retrying.with_options(timeout=30).chat.completions.create(model="scripted", messages=messages)
        assert answer.choices[0].message.content == "ok" and answer.choices[0].finish_reason == "stop"


def test_error_after_stream_started(tiny_tokenizer):
    engine = FailingEngine(ModelInfo(family="qwen2-vl", max_model_len=4096, tokenizer=tiny_tokenizer), "hello world")
    app, _ = scripted_app(tiny_tokenizer, engine=engine)
    with AppServer(app) as srv:
        lines = sse_lines(srv.base_url)
        assert lines[-1] == "data: [DONE]"
        err = json.loads(lines[-2][6:])["error"]
        assert err["type"] == "server_error"
        assert "deadbeef" not in lines[-2] and "secret" not in lines[-2]
        with httpx.Client(timeout=30) as client:
            payload = {"messages": [{"role": "user", "content": "hi"}]}
            r = client.post(srv.base_url + "/v1/chat/completions", json=payload)  # non-streaming: a clean 500
            assert r.status_code == 500 and "secret" not in r.text
            assert r.json()["error"]["type"] == "server_error"
            assert r.headers.get("connection") != "close"
            metrics = client.get(srv.base_url + "/metrics").text
            # both counted as the server's failures (the stream's error event too), not as a
            # client that went away
            assert 'qwenvl_requests_total{outcome="server_error"} 2.0' in metrics
            assert 'qwenvl_requests_total{outcome="cancelled"} 0.0' in metrics
            engine.__class__ = ScriptedEngine
            # the same keep-alive connection serves on
            assert client.post(srv.base_url + "/v1/chat/completions", json=payload).status_code == 200


def test_slow_reader_does_not_block_others(tiny_tokenizer):
    engine = ScriptedEngine(ModelInfo(family="qwen2-vl", max_model_len=10**9, tokenizer=tiny_tokenizer),
                            default_reply="x" * 4_000_000, chunk_chars=50_000)
    app, _ = scripted_app(tiny_tokenizer, engine=engine)
    with AppServer(app) as srv:
        # A raw socket that sends a streaming request and never reads the answer.
        sock = socket.create_connection((srv.host, srv.port))
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.5)
        engine.default_reply = "fast"
        started = time.monotonic()
        for _ in range(5):
            r = chat(srv.base_url, timeout=5)
            assert r.status_code == 200
            assert r.json()["choices"][0]["message"]["content"] == "fast"
        assert time.monotonic() - started < 5
        sock.close()


def test_a_large_logprobs_answer_is_built_while_the_server_answers_others(tiny_tokenizer, monkeypatch):
    """n x max_tokens x (top_logprobs + 1) entries make megabytes of JSON to join: not on the
    event loop. The build (here its first step, each choice's boxes) waits until /health has
    answered; on the event loop, /health could not answer until it gave up waiting."""
    from server.chat.service import ChatService

    read_boxes = ChatService._grounding
    health_answered, order = threading.Event(), []

    def waiting_build(self, p, text):
        if "build waits" not in order:
            order.append("build waits")
            health_answered.wait(10)
            order.append("build goes on")
        return read_boxes(self, p, text)

    monkeypatch.setattr(ChatService, "_grounding", waiting_build)
    with scripted_server(tiny_tokenizer) as srv:
        srv.engine.enqueue("abcdefghijklmnopqrstuvwx")
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(chat, srv.base_url, n=2, max_tokens=8, logprobs=True, top_logprobs=3)
            while "build waits" not in order:
                time.sleep(0.01)
            assert httpx.get(srv.base_url + "/health", timeout=5).status_code == 200
            order.append("health answered")
            health_answered.set()
            r = answer.result(timeout=30)
        assert order.index("health answered") < order.index("build goes on")
        assert r.status_code == 200
        for choice in r.json()["choices"]:
            content = choice["logprobs"]["content"]
            assert [e["token"] for e in content] == ["abc", "def", "ghi", "jkl", "mno", "pqr", "stu", "vwx"]
            assert content[0]["logprob"] == -0.5 and content[0]["bytes"] == list(b"abc")
            assert [t["token"] for t in content[0]["top_logprobs"]] == ["abc", "alt0", "alt1"]
            assert [t["logprob"] for t in content[0]["top_logprobs"]] == [-0.5, -1.0, -2.0]


def test_a_non_streamed_logprobs_answer_holds_about_twice_its_size(tiny_tokenizer):
    """The logprobs were kept as objects, then as response models, then as JSON: the process
    grew by 12 times the response (n=8 x 3,000 tokens x 20 alternatives: 420 MB). Now each
    delta's logprobs are kept as their JSON, and the response is joined from them once."""
    import tracemalloc

    n, tokens = 2, 1000
    with scripted_server(tiny_tokenizer) as srv:
        srv.engine.chunk_chars = 1
        srv.engine.enqueue("x" * tokens)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            with httpx.stream("POST", srv.base_url + "/v1/chat/completions", timeout=120, json={
                    "messages": [{"role": "user", "content": "hi"}], "n": n, "max_tokens": tokens,
                    "logprobs": True, "top_logprobs": 20}) as r:
                body = b"".join(r.iter_bytes())  # (the client's copy: counted below)
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
    assert r.status_code == 200
    choices = json.loads(body)["choices"]
    assert [len(c["logprobs"]["content"]) for c in choices] == [tokens] * n
    assert all(len(e["top_logprobs"]) == 20 for c in choices for e in c["logprobs"]["content"])
    assert peak < 4 * len(body), (peak, len(body))  # server's two copies, the client's one, slack


@pytest.mark.parametrize("stream", [False, True])
def test_a_long_answer_is_read_for_boxes_while_the_server_answers_others(tiny_tokenizer, monkeypatch, stream):
    """Reading boxes from a long answer (a dense OCR answer of 150 KB took 0.2 s) happens
    off the event loop: /health answers while it waits, as for logprobs above."""
    from server.chat.service import ChatService

    read_boxes = ChatService._grounding
    health_answered, order = threading.Event(), []

    def waiting_read(self, p, text):
        if len(text) > 3000:
            order.append("reading waits")
            health_answered.wait(10)
            order.append("reading goes on")
        return read_boxes(self, p, text)

    monkeypatch.setattr(ChatService, "_grounding", waiting_read)
    answer = '<|object_ref_start|>dog<|object_ref_end|><|box_start|>(100,200),(300,400)<|box_end|>' + " ..." * 1000
    content = [{"type": "image_url", "image_url": {"url": data_url(picture(100, 50))}}, {"type": "text", "text": "Find"}]
    with scripted_server(tiny_tokenizer) as srv:
        srv.engine.chunk_chars = 500
        srv.engine.enqueue(answer)
        with ThreadPoolExecutor(1) as pool:
            if stream:
                reply = pool.submit(lambda: [json.loads(line[6:]) for line in sse_lines(
                    srv.base_url, messages=[{"role": "user", "content": content}]) if line != "data: [DONE]"])
            else:
                reply = pool.submit(chat, srv.base_url, content)
            while "reading waits" not in order:
                time.sleep(0.01)
            assert httpx.get(srv.base_url + "/health", timeout=5).status_code == 200
            order.append("health answered")
            health_answered.set()
            result = reply.result(timeout=30)
        assert order.index("health answered") < order.index("reading goes on")
    if stream:
        boxes = next(c["choices"][0]["delta"]["grounding"] for c in result if c["choices"][0]["finish_reason"])
    else:
        boxes = result.json()["choices"][0]["message"]["grounding"]
    assert [(b["phrase"], b["box"]) for b in boxes] == [("dog", [10, 10, 30, 20])]


def test_a_client_that_stops_reading_loses_its_slot_after_the_send_timeout(tiny_tokenizer):
    engine = ScriptedEngine(ModelInfo(family="qwen2-vl", max_model_len=10**9, tokenizer=tiny_tokenizer),
                            default_reply="x" * 4_000_000, chunk_chars=50_000)
    app, _ = scripted_app(tiny_tokenizer, engine=engine, max_concurrent_requests=1, max_queued_requests=0,
                          send_timeout=1.0)
    with AppServer(app) as srv:
        sock = socket.socket()  # sends, then never reads; a small buffer fills at once
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((srv.host, srv.port))
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 5
        while srv.runtime.admission.active < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert chat(srv.base_url, timeout=5).status_code == 429  # its one slot is taken
        deadline = time.monotonic() + 10
        while srv.runtime.admission.active and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.runtime.admission.active == 0  # given up on, while the client still holds the socket
        while engine.num_unfinished_requests() and time.monotonic() < deadline + 5:
            time.sleep(0.05)  # (the engine request is closed on the event loop, maybe a beat later)
        assert engine.num_unfinished_requests() == 0
        engine.default_reply = "fast"
        assert chat(srv.base_url, timeout=5).json()["choices"][0]["message"]["content"] == "fast"
        assert connection_dropped(sock)  # with what was waiting for it (it is not flushed)


def connection_dropped(sock: socket.socket, within: float = 5.0) -> bool:
    """Whether the server ended `sock`'s connection within `within` s (reading and dropping
    what arrives until then); a client that never read gets a reset, or the close after a
    last few bytes."""
    sock.settimeout(within)
    received = 0
    try:
        while chunk := sock.recv(1 << 20):
            received += len(chunk)
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    finally:
        sock.close()
    return received < 4_000_000


def test_a_non_streamed_answer_its_client_never_reads_is_dropped_after_the_send_timeout(tiny_tokenizer, caplog):
    """uvicorn writes a whole body at once and never waits for the client: a 4 MB answer sat
    in the send buffer for as long as its client held the connection without reading (the
    request logged as a 200). After --send-timeout without the client taking anything the
    connection is dropped, and the buffer with it; a client reading slowly keeps it."""
    engine = ScriptedEngine(ModelInfo(family="qwen2-vl", max_model_len=10**9, tokenizer=tiny_tokenizer),
                            default_reply="x" * 4_000_000, chunk_chars=500_000)
    app, _ = scripted_app(tiny_tokenizer, engine=engine, send_timeout=1.0)
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    with AppServer(app) as srv, caplog.at_level(logging.INFO, logger="qwenvl"):
        idle = socket.socket()
        idle.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        idle.connect((srv.host, srv.port))
        idle.sendall(request)
        time.sleep(3)  # answered, and nothing taken for three times the send timeout
        assert connection_dropped(idle, within=0.5)
        assert logged(caplog, lambda message: "took nothing" in message and "connection dropped" in message)
        slow = socket.socket()  # takes 256 KiB every half second: never a whole second without reading
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect((srv.host, srv.port))
        slow.sendall(request)
        slow.settimeout(5)
        received = b""

        def complete() -> bool:
            head, _, answer = received.partition(b"\r\n\r\n")
            length = re.search(rb"content-length: (\d+)", head)
            return bool(length) and len(answer) >= int(length.group(1))

        while not complete():
            time.sleep(0.5)
            burst = 0
            while burst < 256 * 1024 and not complete():
                chunk = slow.recv(256 * 1024)
                assert chunk, "the slow reader's connection was dropped"
                received += chunk
                burst += len(chunk)
        assert received.startswith(b"HTTP/1.1 200") and len(received) > 4_000_000
        slow.close()


def test_errors_are_counted_by_code_wherever_they_are_answered(tiny_tokenizer):
    """qwenvl_errors_total counted the app's error responses only: not a stream that ended
    with an error event, nor the gateway's own 401 and 413. Each is counted once, whether a
    stream failed before its first event (an HTTP error) or after it (an error event)."""
    engine = FailingEngine(ModelInfo(family="qwen2-vl", max_model_len=4096, tokenizer=tiny_tokenizer))
    app, _ = scripted_app(tiny_tokenizer, engine=engine, api_keys=["k"], max_request_bytes=1000)
    key = {"Authorization": "Bearer k"}
    payload = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    with AppServer(app) as srv:
        assert chat(srv.base_url).status_code == 401
        assert chat(srv.base_url, content="x" * 2000, headers=key).status_code == 413
        with httpx.stream("POST", srv.base_url + "/v1/chat/completions", headers=key, json=payload) as r:
            r.read()
            assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        engine.default_reply = "hello"  # (a token first: the stream begins, then fails)
        with httpx.stream("POST", srv.base_url + "/v1/chat/completions", headers=key, json=payload) as r:
            assert r.status_code == 200
            assert any('"internal_error"' in line for line in r.iter_lines())
        metrics = httpx.get(srv.base_url + "/metrics", headers=key).text
        for code, count in (("invalid_api_key", 1), ("request_too_large", 1), ("internal_error", 2)):
            assert f'qwenvl_errors_total{{code="{code}"}} {count:.1f}' in metrics, code


def test_under_a_root_path_the_gateway_knows_the_paths(tiny_tokenizer, caplog):
    """Behind a proxy that keeps the --root-path prefix, the gateway compared the prefixed
    path with its own: probes needed a key, chat requests went unlogged and uncounted."""
    app, _ = scripted_app(tiny_tokenizer, api_keys=["k"], root_path="/llm")
    with AppServer(app) as srv, caplog.at_level(logging.INFO, logger="qwenvl.access"):
        assert httpx.get(srv.base_url + "/llm/health").status_code == 200
        assert httpx.get(srv.base_url + "/llm/v1/models").status_code == 401
        r = httpx.post(srv.base_url + "/llm/v1/chat/completions", headers={"Authorization": "Bearer k"},
                       json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        assert logged(caplog, lambda message: '"path": "/v1/chat/completions"' in message)
        metrics = httpx.get(srv.base_url + "/llm/metrics", headers={"Authorization": "Bearer k"}).text
        assert 'qwenvl_requests_total{outcome="success"} 1.0' in metrics


def test_disconnect_aborts_engine_request(tiny_tokenizer):
    engine = slow_engine(tiny_tokenizer, delay=0.2, reply="x" * 200)
    app, _ = scripted_app(tiny_tokenizer, engine=engine)
    with AppServer(app) as srv:
        with httpx.stream("POST", srv.base_url + "/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": "hi"}], "stream": True}) as r:
            next(r.iter_lines())
        with pytest.raises(httpx.ReadTimeout):
            chat(srv.base_url, timeout=0.5)  # non-streaming, the client gives up
        deadline = time.monotonic() + 5
        while engine.num_unfinished_requests() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.num_unfinished_requests() == 0
        assert len(engine.aborted) >= 2
        assert srv.runtime.admission.active == 0


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_gone_while_its_pictures_download_frees_its_slot_at_once(tiny_tokenizer, image_server,
                                                                          stream, caplog):
    """The client gives up while the server still fetches its picture (an image host that
    answers nothing for 6 s): its slot is free again within a second, not when the fetch
    ends; the next request is served rather than refused; the log says 499, as nothing was
    sent (a stream's was logged a 200)."""
    from support.http_server import silent

    image_server.routes["/silent.png"] = silent(6)
    app, engine = scripted_app(tiny_tokenizer, max_concurrent_requests=1, max_queued_requests=0,
                               image_allow_networks=[f"{IMAGE_HOST}/32"])
    content = [{"type": "image_url", "image_url": {"url": image_server.url("/silent.png")}},
               {"type": "text", "text": "x"}]
    with AppServer(app) as srv, caplog.at_level(logging.INFO, logger="qwenvl.access"):
        with pytest.raises(httpx.ReadTimeout):
            chat(srv.base_url, content, timeout=0.5, stream=stream, headers={"X-Request-Id": "gone"})
        deadline = time.monotonic() + 1
        while srv.runtime.admission.active and time.monotonic() < deadline:
            time.sleep(0.02)
        assert srv.runtime.admission.active == 0
        assert chat(srv.base_url).status_code == 200
        assert engine.history[-1].images == []  # (the abandoned request never reached the engine)
        assert logged(caplog, lambda message: '"request_id": "gone"' in message)
    entry = next(e for e in (json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "qwenvl.access")
                 if e["request_id"] == "gone")
    assert entry["status"] == 499, entry


def test_one_failed_choice_of_n_ends_the_others_at_once(tiny_tokenizer):
    """Non-streaming, n=2: the first choice fails while the second is still generating. The
    error goes back at once, and the second choice must stop then too, closed by the runtime,
    not left to whenever the stream object is freed (a reference cycle through the failure's
    traceback would leave that to a garbage collection, which this test keeps from running)."""
    engine = slow_engine(tiny_tokenizer, delay=0.1, reply="x" * 300)
    app, _ = scripted_app(tiny_tokenizer, engine=engine)
    with AppServer(app) as srv:
        engine.enqueue_cut("x" * 300, "error", only_choice=0)
        gc.disable()  # (what the old code waited for)
        try:
            r = chat(srv.base_url, n=2)
            assert r.status_code == 500 and r.json()["error"]["code"] == "generation_failed"
            deadline = time.monotonic() + 3
            while engine.num_unfinished_requests() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert engine.num_unfinished_requests() == 0
            assert engine.aborted == [engine.history[-1].request_id]
        finally:
            gc.enable()
        assert srv.runtime.admission.active == 0


def test_access_log_line(tiny_tokenizer, caplog):
    app, _ = scripted_app(tiny_tokenizer)
    with AppServer(app) as srv, caplog.at_level(logging.INFO, logger="qwenvl.access"):
        r = chat(srv.base_url, content="my secret prompt", headers={"X-Request-Id": "req-42"})
        assert r.headers["x-request-id"] == "req-42"
        assert logged(caplog, lambda message: '"request_id": "req-42"' in message)
    lines = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "qwenvl.access"]
    entry = next(l for l in lines if l["request_id"] == "req-42")
    assert entry["status"] == 200 and entry["latency_ms"] >= 0
    assert entry["completion_tokens"] >= 1 and "prompt_tokens" in entry
    assert "secret" not in json.dumps(lines)


def test_known_label_values_are_series_from_the_start(tiny_tokenizer):
    """A series that first appears with its first event hides that event from rate() and
    increase() (and so from alerts on the first 5xx or 429)."""
    from prometheus_client.parser import text_string_to_metric_families

    from server.metrics import OUTCOMES

    app, _ = scripted_app(tiny_tokenizer)
    with AppServer(app) as srv:
        text = httpx.get(srv.base_url + "/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    for outcome in OUTCOMES:
        assert samples[("qwenvl_requests_total", (("outcome", outcome),))] == 0
    for reason in ("queue_full", "draining", "body_budget"):
        assert samples[("qwenvl_admission_refused_total", (("reason", reason),))] == 0
    assert samples[("qwenvl_image_cache_total", (("cache", "url"), ("result", "hit")))] == 0
    assert samples[("qwenvl_request_duration_seconds_bucket", (("le", "600.0"),))] == 0


def test_other_paths_are_logged_but_successful_probes_and_scrapes_are_not(tiny_tokenizer, caplog):
    """The access log covered chat completions only: 401s, 404s and 405s left no trace."""
    app, _ = scripted_app(tiny_tokenizer, api_keys=["k"], auth_metrics=False)
    with AppServer(app) as srv, caplog.at_level(logging.INFO, logger="qwenvl.access"):
        key = {"Authorization": "Bearer k"}
        for path in ("/health", "/ready", "/metrics"):
            assert httpx.get(srv.base_url + path, headers={"X-Request-Id": "probe"}).status_code == 200
        assert httpx.get(srv.base_url + "/v1/models", headers={"X-Request-Id": "nokey"}).status_code == 401
        assert httpx.get(srv.base_url + "/v1/models", headers={**key, "X-Request-Id": "models"}).status_code == 200
        assert httpx.get(srv.base_url + "/x" * 1000, headers={**key, "X-Request-Id": "long"}).status_code == 404
        assert httpx.post(srv.base_url + "/health", headers={"X-Request-Id": "post"}).status_code == 405
        assert logged(caplog, lambda message: '"request_id": "post"' in message)
    entries = {e["request_id"]: e for e in (json.loads(rec.getMessage()) for rec in caplog.records
                                            if rec.name == "qwenvl.access")}
    assert "probe" not in entries
    assert (entries["nokey"]["path"], entries["nokey"]["status"]) == ("/v1/models", 401)
    assert (entries["models"]["method"], entries["models"]["status"]) == ("GET", 200)
    assert entries["long"]["status"] == 404 and len(entries["long"]["path"]) == 256
    assert (entries["post"]["path"], entries["post"]["status"]) == ("/health", 405)


def test_access_log_and_outcomes_of_streams(tiny_tokenizer, caplog):
    """A stream is an HTTP 200 however it ends; its log line and the outcome counter say
    how: its tokens when it finished, the error of its final error event, or that the
    client left."""
    engine = slow_engine(tiny_tokenizer, delay=0.1)  # 12 pieces: 1.2 s
    app, _ = scripted_app(tiny_tokenizer, engine=engine, request_timeout=0.6)
    with AppServer(app) as srv, caplog.at_level(logging.INFO, logger="qwenvl.access"):
        engine.delay = 0.0
        payload = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
        with httpx.stream("POST", srv.base_url + "/v1/chat/completions", json=payload, timeout=30,
                          headers={"X-Request-Id": "whole"}) as r:
            assert r.read().endswith(b"data: [DONE]\n\n")
        engine.delay = 0.1
        with httpx.stream("POST", srv.base_url + "/v1/chat/completions", json=payload, timeout=30,
                          headers={"X-Request-Id": "late"}) as r:
            assert b"request_timeout" in r.read()  # the deadline's error event
        with httpx.stream("POST", srv.base_url + "/v1/chat/completions", json=payload, timeout=30,
                          headers={"X-Request-Id": "gone"}) as r:
            next(r.iter_lines())  # the first event, then the client leaves
        deadline = time.monotonic() + 10
        while srv.runtime.admission.active and time.monotonic() < deadline:
            time.sleep(0.05)
        assert logged(caplog, lambda message: '"request_id": "gone"' in message)
        metrics = httpx.get(srv.base_url + "/metrics").text
    entries = {e["request_id"]: e for e in (json.loads(rec.getMessage()) for rec in caplog.records
                                            if rec.name == "qwenvl.access")}
    assert entries["whole"]["status"] == 200 and "error" not in entries["whole"]
    assert entries["whole"]["completion_tokens"] == 12 and entries["whole"]["prompt_tokens"] > 0
    assert (entries["late"]["status"], entries["late"]["error"], entries["late"]["error_status"]) == (
        200, "request_timeout", 504)
    assert (entries["gone"]["error"], entries["gone"]["error_status"]) == ("client_disconnected", 499)
    for outcome in ("success", "server_error", "cancelled"):  # (a 504, as without streaming)
        assert f'qwenvl_requests_total{{outcome="{outcome}"}} 1.0' in metrics, outcome
    # The tokens the engine made for the streams that did not finish count too, in the log
    # and in the counters (they were left out of both).
    assert 0 < entries["late"]["completion_tokens"] < 12 and entries["late"]["prompt_tokens"] > 0
    assert 0 < entries["gone"]["completion_tokens"] < 12 and entries["gone"]["prompt_tokens"] > 0
    made = sum(entries[rid]["completion_tokens"] for rid in ("whole", "late", "gone"))
    assert f"qwenvl_completion_tokens_total {float(made)}" in metrics
    read = sum(entries[rid]["prompt_tokens"] for rid in ("whole", "late", "gone"))
    assert f"qwenvl_prompt_tokens_total {float(read)}" in metrics


def test_request_id_generated_and_sanitised(tiny_tokenizer):
    app, _ = scripted_app(tiny_tokenizer)
    with AppServer(app) as srv:
        assert len(chat(srv.base_url).headers["x-request-id"]) == 32
        bad = chat(srv.base_url, headers={"X-Request-Id": "a b\tc" + "x" * 300})
        assert bad.headers["x-request-id"] != "a b\tc" + "x" * 300


def test_cors_off_by_default_and_configurable(tiny_tokenizer):
    app, _ = scripted_app(tiny_tokenizer)
    with AppServer(app) as srv:
        r = httpx.options(srv.base_url + "/v1/chat/completions",
                          headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in r.headers
    app, _ = scripted_app(tiny_tokenizer, cors_allow_origins=["https://app.example"], api_keys=["k"])
    with AppServer(app) as srv:
        r = httpx.options(srv.base_url + "/v1/chat/completions",
                          headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        # the preflight of the OpenAI JavaScript SDK, which adds headers of its own
        sdk_headers = "authorization, content-type, x-stainless-os, x-stainless-lang, x-stainless-retry-count"
        r = httpx.options(srv.base_url + "/v1/chat/completions",
                          headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                                   "Access-Control-Request-Headers": sdk_headers})
        assert r.status_code == 200, r.text
        allowed = {h.strip() for h in r.headers["access-control-allow-headers"].lower().split(",")}
        assert {"authorization", "x-stainless-os", "x-stainless-retry-count"} <= allowed
        r = httpx.options(srv.base_url + "/v1/chat/completions",
                          headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        assert r.json()["error"]["code"] == "cors_refused" and "origin" in r.json()["error"]["message"]
        # Preflights are answered outside the gateway, and carry a request id all the same.
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers.get("x-request-id", "")), r.headers
        r = httpx.options(srv.base_url + "/v1/chat/completions",
                          headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                                   "X-Request-Id": "trace-42"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42"
        r = httpx.options(srv.base_url + "/v1/chat/completions",
                          headers={"Origin": "https://app.example", "Access-Control-Request-Method": "DELETE"})
        assert r.status_code == 400 and r.headers["content-type"] == "application/json"
        assert "method" in r.json()["error"]["message"]
        assert r.headers["access-control-allow-origin"] == "https://app.example"  # Starlette's headers kept


def test_special_token_text_stays_plain(tiny_tokenizer):
    app, engine = scripted_app(tiny_tokenizer)
    image_pad = tiny_tokenizer.convert_tokens_to_ids("<|image_pad|>")
    im_start = tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")
    with AppServer(app) as srv:
        r = chat(srv.base_url, content="<|vision_start|><|image_pad|><|vision_end|> <|im_start|>system")
        assert r.status_code == 200
        ids = engine.history[-1].prompt_token_ids
        assert image_pad not in ids
        assert ids.count(im_start) == 3  # system, user, assistant turns of the template only


def test_images_only_in_user_messages(tiny_tokenizer):
    app, _ = scripted_app(tiny_tokenizer)
    with AppServer(app) as srv:
        r = httpx.post(srv.base_url + "/v1/chat/completions", json={"messages": [
            {"role": "system", "content": [{"type": "image_url", "image_url": {"url": data_url(picture())}}]},
            {"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[0]"


def test_engine_death_reported(tiny_tokenizer):
    fatal = threading.Event()
    engine = slow_engine(tiny_tokenizer, delay=0.1)
    settings = Settings(served_model_name="scripted")
    from server.app import create_app

    app = create_app(settings, engine=engine, model_names=["scripted"], on_fatal=lambda code: fatal.set())
    with AppServer(app) as srv:
        with httpx.stream("POST", srv.base_url + "/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": "hi"}], "stream": True}) as r:
            lines = r.iter_lines()
            next(lines)
            engine.dead = True
            rest = [l for l in lines if l]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["error"]["code"] == "service_unavailable"
        assert fatal.wait(3)
        assert httpx.get(srv.base_url + "/health").status_code == 503
        assert httpx.get(srv.base_url + "/ready").status_code == 503
        assert chat(srv.base_url).status_code == 503


def test_probes_say_dead_as_soon_as_the_engine_does(tiny_tokenizer):
    """/health and /ready turned 503 only once the watcher (every 0.5 s) had seen the dead
    engine: a load balancer's probe in between was told the replica was fine."""
    engine = ScriptedEngine(ModelInfo(family="qwen2-vl", max_model_len=4096, tokenizer=tiny_tokenizer))
    app = create_app(Settings(served_model_name="scripted"), engine=engine, model_names=["scripted"],
                     on_fatal=lambda code: None)
    with AppServer(app) as srv, httpx.Client(base_url=srv.base_url) as client:
        assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200
        engine.dead = True  # (the probes below come within milliseconds, the watcher's look within 0.5 s)
        r = client.get("/ready")
        assert (r.status_code, r.json()["status"]) == (503, "dead")
        assert client.get("/health").status_code == 503
        r = chat(srv.base_url)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"


def test_a_stream_that_fails_before_its_first_event_is_an_http_error(tiny_tokenizer):
    """Its head goes out with its first event: before it, nothing has begun, and a failure is
    the status the SDK raises and retries (a 503 when the engine stops: a proxy passes that
    to another replica) rather than a 200 whose stream holds an error event."""
    engine = SilentlyDeadEngine(ModelInfo(family="qwen2-vl", max_model_len=4096, tokenizer=tiny_tokenizer),
                                default_reply="abc", chunk_chars=1, delay=1.0)
    fatal: list[int] = []
    app = create_app(Settings(served_model_name="scripted", request_timeout=0.5), engine=engine,
                     model_names=["scripted"], on_fatal=fatal.append)
    with AppServer(app) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        messages = [{"role": "user", "content": "hi"}]
        # the deadline, before the first token: a 504 (which the SDK does not retry)
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model="scripted", messages=messages, stream=True)
        assert info.value.status_code == 504 and info.value.body["code"] == "request_timeout"
        assert info.value.response.headers["x-should-retry"] == "false"
        # the engine stops while the request waits for its first token: a 503 to retry
        srv.runtime.settings.request_timeout = 30
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(lambda: httpx.post(srv.base_url + "/v1/chat/completions", timeout=10, json={
                "model": "scripted", "messages": messages, "stream": True}))
            deadline = time.monotonic() + 5
            while srv.runtime.admission.active < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            engine.died = True
            r = waiting.result()
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "service_unavailable" and "engine" in r.json()["error"]["message"]
        assert r.headers["content-type"].startswith("application/json")


def test_a_failure_to_start_serving_with_the_loaded_engine_ends_the_process(tiny_tokenizer, caplog):
    """Building what serves the engine (its image loader, say) failed in a task nobody
    awaited: the server stayed "loading" for good, /health 200, nothing in the log."""
    engine = ScriptedEngine(ModelInfo(family="qwen2-vl", max_model_len=4096, tokenizer=tiny_tokenizer))
    fatal = []

    def images_factory(_engine):
        raise ValueError("no image loader today")

    app = create_app(Settings(served_model_name="scripted"), engine_factory=lambda: engine,
                     images_factory=images_factory, model_names=["scripted"], on_fatal=fatal.append)
    with caplog.at_level(logging.ERROR), AppServer(app, wait_ready=False) as srv:
        deadline = time.monotonic() + 10
        while not fatal and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fatal == [1]
        assert httpx.get(srv.base_url + "/ready").status_code == 503
        assert chat(srv.base_url).status_code == 503
    assert "failed to start" in caplog.text and "no image loader today" in caplog.text


def test_the_startup_heap_is_frozen_once_a_loaded_engine_is_installed(tiny_tokenizer):
    """Full garbage collections must not walk the millions of start-up objects while serving
    (0.4 s for the imports alone, measured): the server freezes them once the engine loads."""
    import gc

    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    app = create_app(Settings(served_model_name="scripted"),
                     engine_factory=lambda: slow_engine(tiny_tokenizer, 0.0), model_names=["scripted"])
    try:
        with AppServer(app) as server:
            assert httpx.get(server.base_url + "/ready").status_code == 200
            assert gc.get_freeze_count() > 0
            # Serving goes on as usual afterwards.
            r = httpx.post(server.base_url + "/v1/chat/completions",
                           json={"model": "scripted", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200, r.text
    finally:
        gc.unfreeze()  # the rest of the test session collects as usual


def test_a_long_drain_logs_what_it_waits_for_and_lets_the_stream_finish(tiny_tokenizer, monkeypatch, caplog):
    """While it waits, a drain reports every few seconds how many requests are open and what
    the engine is doing (the evidence for telling slow generation from a stuck request)."""
    import server.runtime

    monkeypatch.setattr(server.runtime, "_DRAIN_REPORT_S", 0.2)
    app, _ = scripted_app(tiny_tokenizer, engine=slow_engine(tiny_tokenizer, delay=0.3))  # ~3.6 s
    with AppServer(app) as srv:
        done: list = []
        reader = threading.Thread(target=lambda: done.append(sse_lines(srv.base_url)))
        reader.start()
        deadline = time.monotonic() + 10
        while srv.runtime.admission.active < 1:
            assert time.monotonic() < deadline, "the stream never started"
            time.sleep(0.01)
        with caplog.at_level(logging.INFO, logger="server.runtime"):
            srv.call(srv.runtime.drain(30))
        reader.join(10)
    reports = [r.getMessage() for r in caplog.records if r.getMessage().startswith("draining: 1 requests open")]
    assert reports and "engine: 1 unfinished" in reports[0], reports
    # The drain ended because the stream finished, not by its timeout.
    assert not any("drain timeout" in r.getMessage() for r in caplog.records)
    events = [json.loads(line[6:]) for line in done[0] if line.startswith("data: {")]
    assert not any("error" in e for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_admission_is_idle_once_the_last_waiter_gives_up():
    """A waiter woken by the last release that gives up before it runs left the idle event
    cleared: a drain then waited out its whole timeout for nothing."""
    from server.admission import Admission
    from server.metrics import Metrics

    async def scenario():
        admission = Admission(1, 4, Metrics())
        release = await admission.acquire()
        waiter = asyncio.create_task(admission.acquire())
        await asyncio.sleep(0)
        assert admission.queued == 1
        release()  # wakes the waiter...
        waiter.cancel()  # ...which gives up before it runs
        await asyncio.gather(waiter, return_exceptions=True)
        assert (admission.active, admission.queued) == (0, 0)
        await asyncio.wait_for(admission.wait_idle(), 1)

    asyncio.run(scenario())


def test_admission_is_not_idle_while_a_request_that_waited_for_its_slot_runs():
    """A queued request that got its slot went through a moment with nothing counted active
    or queued, and a drain waiting for idle woke there: the server then shut down under
    that request (uvicorn cancelled it 5 s later, a plain-text 500)."""
    from server.admission import Admission
    from server.metrics import Metrics

    async def scenario():
        admission = Admission(1, 4, Metrics())
        release_first = await admission.acquire()
        second = asyncio.create_task(admission.acquire())
        await asyncio.sleep(0)
        admission.closed = True  # draining: waits for idle
        idle = asyncio.create_task(admission.wait_idle())
        release_first()
        release_second = await second
        await asyncio.sleep(0.05)
        assert (admission.active, admission.queued) == (1, 0)
        assert not idle.done(), "drain woke while a request was running"
        release_second()
        await asyncio.wait_for(idle, 1)

    asyncio.run(scenario())


def test_a_drain_waits_for_a_request_that_was_queued_when_it_began(tiny_tokenizer):
    """The queued request gets its slot when the first finishes, and the drain goes on
    until it too has its whole answer."""
    app, _ = scripted_app(tiny_tokenizer, engine=slow_engine(tiny_tokenizer, delay=0.1),  # ~1.2 s each
                          max_concurrent_requests=1)
    with AppServer(app) as srv:
        results: dict[str, Any] = {}
        first = threading.Thread(target=lambda: results.update(first=sse_lines(srv.base_url)))
        first.start()
        deadline = time.monotonic() + 10
        while srv.runtime.admission.active < 1:
            assert time.monotonic() < deadline, "the stream never started"
            time.sleep(0.01)
        def ask() -> None:
            results["second"] = chat(srv.base_url)
            results["answered"] = time.monotonic()

        second = threading.Thread(target=ask)
        second.start()
        while srv.runtime.admission.queued < 1:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.01)
        srv.call(srv.runtime.drain(30), timeout=40)
        drained = time.monotonic()
        first.join(10)
        second.join(10)
    # (the slot is given back just before the answer is written: the drain ends a moment
    # before the client has it, not the 1.2 s of generation before)
    assert results["answered"] - drained < 0.6, "the drain ended while the queued request ran"
    assert results["first"][-1] == "data: [DONE]"
    assert results["second"].status_code == 200
    assert results["second"].json()["choices"][0]["message"]["content"] == "abcdefghijkl"
    # (answered during the drain: its connection is not kept for more requests here)
    assert results["second"].headers["connection"] == "close"


def test_a_drain_out_of_time_turns_the_queue_away_with_a_503(tiny_tokenizer):
    """Requests still queued when the drain's time is up get a 503 with Retry-After, which
    the SDK and nginx retry elsewhere: admitted then, they were cut off at once, a stream as
    a 200 ending in an error event that nothing retries."""
    app, engine = scripted_app(tiny_tokenizer, engine=slow_engine(tiny_tokenizer, delay=0.5),  # ~6 s each
                               max_concurrent_requests=1)
    with AppServer(app) as srv:
        results: dict[str, Any] = {}
        first = threading.Thread(target=lambda: results.update(first=sse_lines(srv.base_url)))
        first.start()
        deadline = time.monotonic() + 10
        while srv.runtime.admission.active < 1:
            assert time.monotonic() < deadline, "the stream never started"
            time.sleep(0.01)

        def ask() -> None:
            payload = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
            with httpx.stream("POST", srv.base_url + "/v1/chat/completions", json=payload, timeout=30) as r:
                results["second"] = (r.status_code, r.headers.get("retry-after"), r.read())

        second = threading.Thread(target=ask)
        second.start()
        while srv.runtime.admission.queued < 1:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.01)
        srv.call(srv.runtime.drain(1), timeout=20)
        first.join(10)
        second.join(10)
    status, retry_after, body = results["second"]
    assert status == 503 and retry_after is not None
    assert "shutting down" in json.loads(body)["error"]["message"]
    assert len(engine.history) == 1, "the queued request reached the engine"
    assert "error" in results["first"][-2]  # the admitted stream is cut off, as before


def _read_answer(sock: socket.socket) -> tuple[bytes, bytes]:
    """The head and body of the one answer on `sock`, read until the server closes it."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    head, _, payload = data.partition(b"\r\n\r\n")
    return head, payload


def _start_drain(srv: AppServer, timeout: float) -> threading.Thread:
    drain = threading.Thread(target=lambda: srv.call(srv.runtime.drain(timeout), timeout=timeout + 20))
    drain.start()
    deadline = time.monotonic() + 5
    while not srv.runtime.draining:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return drain


def test_a_drain_serves_a_request_whose_body_was_still_arriving_when_it_began(tiny_tokenizer):
    """A request that arrived before the drain is served, even if the last of its body comes
    after; the drain waits for it. (It used to end at once with nothing admitted; the
    request then got a 503 and, had its body come later still, uvicorn's plain-text 500.)
    A request that arrives during the drain gets its 503 without sending its body."""
    app, _ = scripted_app(tiny_tokenizer)
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode())
    with AppServer(app) as srv:
        early = socket.create_connection((srv.host, srv.port))
        early.settimeout(20)
        early.sendall(head + body[:10])
        deadline = time.monotonic() + 5
        while srv.runtime.requests_open < 1:  # (the server has the request's head)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        drain = _start_drain(srv, 30)
        late = socket.create_connection((srv.host, srv.port))
        late.settimeout(10)
        late.sendall(head)  # and no body
        late_head, late_payload = _read_answer(late)
        assert late_head.startswith(b"HTTP/1.1 503"), late_head
        assert b"retry-after: 1" in late_head.lower()
        assert "shutting down" in json.loads(late_payload)["error"]["message"]
        time.sleep(0.5)
        assert drain.is_alive(), "the drain ended while a request's body was still arriving"
        early.sendall(body[10:])
        early_head, early_payload = _read_answer(early)
        drain.join(10)
        assert not drain.is_alive()
    assert early_head.startswith(b"HTTP/1.1 200"), early_head
    assert json.loads(early_payload)["choices"][0]["message"]["content"]


def test_a_drain_out_of_time_cuts_off_a_body_still_arriving_with_a_503(tiny_tokenizer):
    """At the drain's end a request still sending its body gets a JSON 503 with Retry-After
    (which a client or proxy may retry elsewhere), not uvicorn's plain-text 500 5 s later."""
    app, _ = scripted_app(tiny_tokenizer, body_read_timeout=20)
    with AppServer(app) as srv:
        sock = socket.create_connection((srv.host, srv.port))
        sock.settimeout(20)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"messages\"")
        deadline = time.monotonic() + 5
        while srv.runtime.requests_open < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        started = time.monotonic()
        _start_drain(srv, 1).join(30)
        head, payload = _read_answer(sock)
        assert time.monotonic() - started < 5
    assert head.startswith(b"HTTP/1.1 503"), head
    assert b"retry-after: 1" in head.lower() and b"connection: close" in head.lower()
    error = json.loads(payload)["error"]
    assert error["code"] == "service_unavailable" and error["type"] == "server_error"
    assert "before the request body had arrived" in error["message"]
