"""deploy/nginx in front of two real qwen-vl-serve replicas (tiny model, CPU, loopback).

Shows what the configuration promises: requests spread over the replicas, SSE streamed
through incrementally, session affinity, a killed replica costs no later request, a
SIGTERM'd replica drains while the other takes new work, and a saturated replica's 429
reaches the client with its Retry-After. The module starts its processes once; tests that
stop a replica leave `cluster.ensure_up()` to restart it for the next one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from server.healthcheck import server_argv
from support.http_client import shared_client
from support.live_server import process_report

NGINX_DIR = Path(__file__).resolve().parents[2] / "deploy" / "nginx"

# Real engines (`make test-fast` leaves them out). Replica start-up (up to READY_TIMEOUT_S)
# counts toward the first test and toward any test that restarts a replica.
pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]

SESSION_HEADER = "X-Session-ID"
# Long enough that a generation lasts seconds on the tiny CPU model (256 took 0.5-1 s), so
# that requests sent together all overlap at the replica even on a slow machine.
LONG_TOKENS = 1024
SHORT_TOKENS = 4
# A stream of several seconds on the tiny CPU model: long enough to tell incremental delivery
# from buffering.
STREAM_TOKENS = 1500
# The stream a replica is generating when it gets SIGTERM: long enough that the test sees it
# in flight on the replica's /metrics before it ends (2,000 tokens took 4.2 s with the front
# end on its own core), and well inside the replicas' drain timeout (90 s) on a slower machine.
DRAIN_STREAM_TOKENS = 3500
# Load threads, a stream reader and /metrics polls run at once here (support.http_client).
HTTP = shared_client()


def chat_body(max_tokens: int, stream: bool = False) -> dict:
    return {
        "model": "tiny",  # the replicas' --served-model-name
        "messages": [{"role": "user", "content": "Describe a lighthouse."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


def post_chat(url: str, *, max_tokens: int = SHORT_TOKENS, session: str | None = None,
              timeout: float = 120) -> tuple[str, httpx.Response]:
    """One non-streaming chat completion through `url`; returns (request id sent, response)."""
    rid = f"test-{uuid.uuid4().hex}"
    headers = {"X-Request-Id": rid}
    if session is not None:
        headers[SESSION_HEADER] = session
    response = HTTP.post(f"{url}/v1/chat/completions", json=chat_body(max_tokens),
                          headers=headers, timeout=timeout)
    return rid, response


def served_by(nginx, rid: str) -> str:
    """Address of the replica that produced the response to request `rid`."""
    return nginx.entry(rid).upstreams[-1]


def session_for(cluster, replica, attempts: int = 64) -> str:
    """A session id that the consistent hash maps to `replica`."""
    for i in range(attempts):
        session = f"session-{i}"
        rid, response = post_chat(cluster.nginx.url, max_tokens=1, session=session)
        assert response.status_code == 200, response.text
        if served_by(cluster.nginx, rid) == replica.addr:
            return session
    raise AssertionError(f"no session id among {attempts} maps to {replica.addr}")


def test_shipped_config_passes_nginx_t(nginx_binary, tmp_path):
    """The files as shipped (example replica addresses, port 80) form a valid configuration."""
    (tmp_path / "qwen-vl-serve").mkdir()
    (tmp_path / "qwen-vl-serve" / "upstreams.conf").write_text((NGINX_DIR / "upstreams.conf").read_text())
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"pid {tmp_path}/nginx.pid;\nevents {{}}\nhttp {{\n"
                    f"    include {NGINX_DIR}/qwen-vl-serve.conf;\n"
                    f"    access_log {tmp_path}/access.log qwenvl;\n}}\n")
    out = subprocess.run([nginx_binary, "-t", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "error.log")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "warn" not in out.stderr, out.stderr


def test_requests_spread_over_both_replicas(cluster):
    cluster.ensure_up()
    rids = []
    for _ in range(6):
        rid, response = post_chat(cluster.nginx.url)
        assert response.status_code == 200, response.text
        # X-Request-Id reaches the replica and comes back unchanged.
        assert response.headers["x-request-id"] == rid
        rids.append(rid)
    served = Counter(served_by(cluster.nginx, rid) for rid in rids)
    assert set(served) == {r.addr for r in cluster.replicas}, served

    # Without a client id, nginx makes one up, passes it on, and the replica echoes it.
    response = HTTP.post(f"{cluster.nginx.url}/v1/chat/completions", json=chat_body(1), timeout=60)
    assert response.status_code == 200
    generated = response.headers["x-request-id"]
    assert served_by(cluster.nginx, generated) in served

    # An id the replica would not accept (a `/`): nginx puts its own in, the one both logs
    # and the response carry.
    response = HTTP.post(f"{cluster.nginx.url}/v1/chat/completions", json=chat_body(1),
                         headers={"X-Request-Id": "bad/id+x"}, timeout=60)
    assert response.status_code == 200 and response.headers["x-request-id"] != "bad/id+x"
    assert served_by(cluster.nginx, response.headers["x-request-id"]) in served


def test_stream_arrives_incrementally_through_nginx(cluster):
    """Tokens reach the client as they are generated, not all at the end."""
    cluster.ensure_up()
    client = openai.OpenAI(base_url=f"{cluster.nginx.url}/v1", api_key="unused", max_retries=0, timeout=120)
    # The SDK builds its response models on first use, which takes seconds on a busy machine
    # and would delay the first chunk of the measured stream.
    list(client.chat.completions.create(**chat_body(1, stream=True)))
    start = time.monotonic()
    arrivals = []
    stream = client.chat.completions.create(**chat_body(STREAM_TOKENS, stream=True))
    finish_reason = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
        if chunk.choices and chunk.choices[0].finish_reason:
            finish_reason = chunk.choices[0].finish_reason
    assert finish_reason is not None
    assert len(arrivals) >= 10, f"only {len(arrivals)} content chunks"
    first, last = arrivals[0] - start, arrivals[-1] - start
    # Buffered, every chunk would arrive within milliseconds of the last one.
    assert last - first >= max(0.2, 0.3 * last), f"first chunk at {first:.2f} s, last at {last:.2f} s"


def test_session_header_keeps_a_conversation_on_one_replica(cluster):
    cluster.ensure_up()
    for replica in cluster.replicas:
        session = session_for(cluster, replica)
        for _ in range(3):
            rid, response = post_chat(cluster.nginx.url, session=session)
            assert response.status_code == 200, response.text
            assert served_by(cluster.nginx, rid) == replica.addr


def test_replica_error_passes_through_unchanged(cluster):
    # nginx answers some errors itself as JSON (tests/deploy/test_nginx_errors.py); a
    # replica's own error must reach the client as the replica wrote it, not replaced.
    response = HTTP.post(f"{cluster.nginx.url}/v1/chat/completions", timeout=60,
                         json={"model": cluster.served_model, "max_tokens": -1,
                               "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "max_tokens" and "max_tokens" in error["message"]
    assert error["code"] != "bad_request"  # nginx's own 400 code


def test_a_header_the_replicas_accept_passes_the_balancer(cluster):
    """A 20 KB header line (a long token, a trace header) is within a replica's head limit:
    nginx's default buffers (8 KiB a line) refused it with a 400."""
    cluster.ensure_up()
    response = HTTP.get(f"{cluster.nginx.url}/v1/models", headers={"X-Big": "a" * 20_000}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["data"][0]["id"] == cluster.served_model


def test_the_containers_healthcheck_finds_a_replica_and_asks_it(cluster):
    """`qwen-vl-healthcheck` as the image's HEALTHCHECK runs it, with no arguments: it reads
    the server's own command line from /proc (here `python -m server.cli --port N ...`)."""
    cluster.ensure_up()
    found = server_argv()
    assert found and int(found[found.index("--port") + 1]) in {r.port for r in cluster.replicas}, found
    env = {k: v for k, v in os.environ.items() if not k.startswith("QWENVL_")}
    checked = subprocess.run([str(Path(sys.executable).parent / "qwen-vl-healthcheck")],
                             capture_output=True, text=True, timeout=60, env=env)
    assert checked.returncode == 0, checked.stderr


def test_saturated_replica_429_reaches_client_with_retry_after(cluster):
    cluster.ensure_up()
    target = cluster.replicas[0]
    session = session_for(cluster, target)  # pin every request to one replica
    n = cluster.max_concurrent + cluster.max_queued + 3
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda _: post_chat(cluster.nginx.url, max_tokens=LONG_TOKENS, session=session),
                                range(n)))
    statuses = Counter(response.status_code for _, response in results)
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[429] >= 1 and statuses[200] >= cluster.max_concurrent, statuses
    for rid, response in results:
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 0
            assert response.json()["error"]["type"] == "rate_limit_error"
        # Answered by the pinned replica alone: a 429 is not retried elsewhere.
        assert cluster.nginx.entry(rid).upstreams == [target.addr]
    # A 429 is not a failure for max_fails: the replica stays in rotation.
    rid, response = post_chat(cluster.nginx.url, session=session)
    assert response.status_code == 200 and served_by(cluster.nginx, rid) == target.addr


def test_killed_replica_loses_no_subsequent_request(cluster):
    cluster.ensure_up()
    victim, survivor = cluster.replicas
    victim_session = session_for(cluster, victim)
    victim.kill_all()

    rids = []
    for i in range(8):
        # Half pinned to the dead replica: those must fail over too.
        rid, response = post_chat(cluster.nginx.url, session=victim_session if i % 2 else None)
        assert response.status_code == 200, response.text
        rids.append(rid)
    with ThreadPoolExecutor(3) as pool:
        burst = list(pool.map(lambda _: post_chat(cluster.nginx.url), range(3)))
    assert all(response.status_code == 200 for _, response in burst), [r.text for _, r in burst]
    rids += [rid for rid, _ in burst]

    entries = [cluster.nginx.entry(rid) for rid in rids]
    assert all(e.upstreams[-1] == survivor.addr for e in entries)
    # Some requests did try the dead replica first (refused connection) and moved on.
    assert any(e.upstreams[0] == victim.addr for e in entries)


@dataclass
class Outcome:
    started: float
    ended: float = 0.0
    rid: str = ""
    status: int | None = None
    error: str | None = None


@dataclass
class StreamOutcome:
    first_chunk: threading.Event = field(default_factory=threading.Event)
    finish_reason: str | None = None
    chunks: int = 0
    error: str | None = None


def _stream_pinned(url: str, session: str, out: StreamOutcome) -> None:
    """A long stream pinned to one replica, read with plain httpx."""
    try:
        with HTTP.stream("POST", f"{url}/v1/chat/completions", json=chat_body(DRAIN_STREAM_TOKENS, stream=True),
                          headers={SESSION_HEADER: session}, timeout=120) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line.removeprefix("data: "))
                if "error" in event:
                    out.error = str(event["error"])
                for choice in event.get("choices", []):
                    out.chunks += 1
                    out.finish_reason = choice.get("finish_reason") or out.finish_reason
                    out.first_chunk.set()
    except httpx.HTTPError as exc:  # recorded and asserted on by the test
        out.error = repr(exc)
    finally:
        out.first_chunk.set()


def test_sigterm_drains_one_replica_while_the_other_takes_new_work(cluster):
    cluster.ensure_up()
    draining, survivor = cluster.replicas[1], cluster.replicas[0]
    session = session_for(cluster, draining)

    # Steady load through nginx, below what one replica admits (no 429 expected).
    stop = threading.Event()
    outcomes: list[Outcome] = []

    def load() -> None:
        while not stop.is_set():
            outcome = Outcome(started=time.monotonic())
            try:
                outcome.rid, response = post_chat(cluster.nginx.url)
                outcome.status = response.status_code
            except httpx.HTTPError as exc:
                outcome.error = repr(exc)
            outcome.ended = time.monotonic()
            outcomes.append(outcome)

    workers = [threading.Thread(target=load) for _ in range(cluster.max_concurrent)]
    for w in workers:
        w.start()
    # A long stream in flight on the replica about to drain.
    stream = StreamOutcome()
    stream_thread = threading.Thread(target=_stream_pinned, args=(cluster.nginx.url, session, stream))
    stream_thread.start()
    try:
        assert stream.first_chunk.wait(60) and stream.error is None, (stream.error, process_report())
        # The first chunk came from the pinned replica, so it is generating the stream; the
        # SIGTERM follows at once (the load is already running), so the stream is mid-way. (No
        # /metrics poll here: this process's reader threads can starve it for seconds.)
        stream_open_at_sigterm = stream_thread.is_alive() and stream.finish_reason is None
        sigterm_at = time.monotonic()
        draining.signal(signal.SIGTERM)
        exit_code = processes = None
        for limit in (cluster.drain_timeout, 30):
            try:
                exit_code = draining.wait(limit)
                break
            except subprocess.TimeoutExpired:
                processes = processes or process_report()  # while a stalled drain still stalls
        exited_at = time.monotonic()
        time.sleep(2.0)  # more load after the drained replica is gone
    finally:
        stop.set()
        for w in workers:
            w.join(150)
        stream_thread.join(150)

    assert exit_code == 0, (exit_code, draining.log_tail(40), processes)
    # The stream, still being generated at the SIGTERM, was allowed to finish.
    assert stream_open_at_sigterm, "the stream ended before the SIGTERM"
    # Server-side truth, not the client's view: the replica had work in flight when it began.
    drain = re.search(r"draining: up to \d+ s for (\d+) in-flight requests", draining.log_path.read_text(errors="replace"))
    assert drain and int(drain.group(1)) >= 1, draining.log_tail(60)
    # The replica's own log says what it was doing meanwhile (the test sees only the stream).
    assert stream.error is None and stream.finish_reason == "length", (stream, draining.log_tail(120), processes)

    failed = [o for o in outcomes if o.error or o.status != 200]
    assert not failed, failed
    assert len(outcomes) >= 4
    # New work after the SIGTERM went to the other replica.
    late = [o for o in outcomes if o.started > sigterm_at + 0.5]
    assert late
    # The log read whole, not once per request: the load sends thousands of them. nginx
    # logs a request a moment after its client saw the last byte, hence the short wait.
    deadline = time.monotonic() + 10
    entries = cluster.nginx.log_entries()
    while any(o.rid not in entries for o in late) and time.monotonic() < deadline:
        time.sleep(0.1)
        entries = cluster.nginx.log_entries()
    assert all(entries[o.rid].upstreams[-1] == survivor.addr for o in late)
    assert any(o.started > exited_at for o in outcomes)
