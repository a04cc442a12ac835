"""Lifecycle on the real process and the real engine: client disconnects abort engine work,
SIGTERM drains, a dead engine core is reported and the process exits non-zero."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass

import httpx
import psutil
import pytest

from support.http_client import request_from_child, shared_client
from support.live_server import ServerProcess

pytestmark = pytest.mark.engine

LONG = {"max_tokens": 3900, "ignore_eos": True, "temperature": 0}


_STARTED: list[ServerProcess] = []


@pytest.fixture(autouse=True)
def _stop_servers():
    """A failed test must not leave a server (and its busy engine) running."""
    yield
    while _STARTED:
        _STARTED.pop().stop()


@pytest.fixture
def http():
    """Every request of a test, from every thread (see support.http_client)."""
    with shared_client() as client:
        yield client


def start(tiny_model, tmp_path, *extra: str) -> ServerProcess:
    srv = ServerProcess(
        ["--model", str(tiny_model("qwen2-vl")), "--served-model-name", "tiny", "--max-model-len", "4096",
         "--max-num-seqs", "16", *extra],
        tmp_path / "server.log",
    )
    _STARTED.append(srv)
    return srv.start()


def metric(http: httpx.Client, base_url: str, name: str) -> float:
    text = http.get(base_url + "/metrics").text
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    assert m, name
    return float(m.group(1))


def server_state(http: httpx.Client, srv: ServerProcess) -> str:
    """The server's request gauges and the end of its log, for an assertion's message."""
    text = http.get(srv.base_url + "/metrics").text
    gauges = [line for line in text.splitlines()
              if line.startswith(("qwenvl_requests_", "qwenvl_engine_", "qwenvl_admission_", "qwenvl_completion_tokens"))]
    return "\n".join(gauges) + "\n" + srv.log_tail(30)


@dataclass
class Stream:
    thread: threading.Thread
    started: threading.Event  # set at the first event: the server admitted the request and runs it


def open_stream(http: httpx.Client, base_url: str, results: list, **body) -> Stream:
    """Stream one completion in a thread; append ("ok", status, lines) or ("error", exc) to
    `results` at the end."""
    started = threading.Event()

    def run():
        try:
            payload = {"model": "tiny", "messages": [{"role": "user", "content": "go"}], "stream": True, **body}
            lines = []
            with http.stream("POST", base_url + "/v1/chat/completions", json=payload) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        started.set()
            results.append(("ok", r.status_code, lines))
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion
            results.append(("error", exc))
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return Stream(t, started)


def wait_streaming(streams: list[Stream], srv: ServerProcess, results: list, timeout: float = 90) -> None:
    """Wait until every stream has its first event, so each is in process in the server.

    (Not by polling /metrics: in this process the reader threads hold the GIL for most of
    each poll, and CI once saw no poll complete before two 3,900-token streams had ended.)"""
    deadline = time.monotonic() + timeout
    for s in streams:
        while not s.started.wait(0.1):
            assert s.thread.is_alive() and time.monotonic() < deadline, f"{results}\n{srv.log_tail(20)}"


def thread_cpus(pid: int) -> list[set[int]]:
    """The CPU mask of every thread of process `pid`."""
    return [set(os.sched_getaffinity(t.id)) for t in psutil.Process(pid).threads()]


def assert_cpu_split(srv: ServerProcess, engine_core_cpus: str) -> None:
    """Where vLLM binds the model worker to some cores, the front end runs on the others only,
    and the engine core on `engine_core_cpus` (server.engine.vllm_engine._split_cores)."""
    allowed = set(os.sched_getaffinity(0))
    procs = psutil.Process(srv.proc.pid).children(recursive=True)
    worker_cpus = set().union(*(set(p.cpu_affinity()) for p in procs if "Worker" in p.name()))
    if worker_cpus and worker_cpus < allowed:
        core = [p for p in psutil.Process(srv.proc.pid).children() if "EngineCor" in p.name()]
        assert core
        assert all(cpus == allowed - worker_cpus for cpus in thread_cpus(srv.proc.pid))
        core_cpus = {"any": allowed, "front-end": allowed - worker_cpus, "workers": worker_cpus}[engine_core_cpus]
        assert all(cpus == core_cpus for cpus in thread_cpus(core[0].pid))


def test_disconnects_stop_engine_work(tiny_model, tmp_path, http):
    srv = start(tiny_model, tmp_path)
    assert_cpu_split(srv, "any")
    try:
        hang_ups = []  # what closing drops the connection: a streamed response, or a socket
        for i in range(8):
            payload = {"model": "tiny", "messages": [{"role": "user", "content": f"story {i}"}], **LONG}
            if i % 2 == 0:  # streaming: read one event, then hang up
                resp = http.send(http.build_request("POST", srv.base_url + "/v1/chat/completions",
                                                    json={**payload, "stream": True}), stream=True)
                next(resp.iter_lines())
                hang_ups.append(resp)
            else:  # non-streaming: send the request on a raw socket, close it later unread
                hang_ups.append(_send_raw(srv, payload))
        deadline = time.monotonic() + 20
        while (running := metric(http, srv.base_url, "qwenvl_requests_running")) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert running >= 4, server_state(http, srv)  # the engine is busy with them
        for conn in hang_ups:
            conn.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if (metric(http, srv.base_url, "qwenvl_engine_unfinished_requests") == 0
                    and metric(http, srv.base_url, "qwenvl_requests_running") == 0):
                break
            time.sleep(0.2)
        # The engine's own counters: nothing running, nothing left in its queues.
        assert metric(http, srv.base_url, "qwenvl_engine_unfinished_requests") == 0, server_state(http, srv)
        assert metric(http, srv.base_url, "qwenvl_requests_running") == 0, server_state(http, srv)
        # 8 x 3900 tokens were asked for; far fewer were generated before the aborts (36 here),
        # and those count (they were left out of the counter before).
        made = metric(http, srv.base_url, "qwenvl_completion_tokens_total")
        assert 0 < made < 8 * 3900 / 2
        r = http.post(srv.base_url + "/v1/chat/completions", timeout=60,
                      json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200
    finally:
        srv.stop()


def _send_raw(srv: ServerProcess, payload: dict) -> socket.socket:
    body = json.dumps(payload).encode()
    sock = socket.create_connection((srv.host, srv.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def test_sigterm_drains_in_flight_streams(tiny_model, tmp_path, http):
    srv = start(tiny_model, tmp_path, "--drain-timeout", "60")
    results: list = []
    streams = [open_stream(http, srv.base_url, results, max_tokens=3000, ignore_eos=True) for _ in range(3)]
    wait_streaming(streams, srv, results)  # all three are in process
    srv.signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while request_from_child("GET", srv.base_url + "/ready")[0] != 503:  # the drain has begun
        assert time.monotonic() < deadline and not results, results
    status, headers = request_from_child("POST", srv.base_url + "/v1/chat/completions",
                                         {"model": "tiny", "messages": [{"role": "user", "content": "x"}]})
    assert status == 503 and headers.get("retry-after")
    assert not results  # (all of this while the three streams still ran)
    for s in streams:
        s.thread.join(120)
    assert srv.wait(60) == 0
    assert len(results) == 3
    for kind, status, lines in results:
        assert kind == "ok" and status == 200
        assert lines[-1] == "data: [DONE]"
        finishes = [json.loads(l[6:])["choices"][0].get("finish_reason") for l in lines
                    if l.startswith("data: {") and json.loads(l[6:])["choices"]]
        assert "length" in finishes  # every stream ran to its end


def test_ctrl_c_to_the_process_group_drains_like_sigterm(tiny_model, tmp_path, http):
    """Ctrl+C in a terminal (like `kill -- -PGID` or supervisord's stopasgroup) signals the
    whole process group. The engine processes lead a group of their own, so the signal
    reaches the server alone, which drains; it used to reach the model worker too, which
    died under the streams in flight."""
    srv = start(tiny_model, tmp_path, "--drain-timeout", "60")
    engine = [p for p in psutil.Process(srv.proc.pid).children(recursive=True) if "VLLM" in p.name()]
    assert len(engine) >= 2 and all(os.getpgid(p.pid) != srv.proc.pid for p in engine), \
        [(p.name(), os.getpgid(p.pid)) for p in engine]  # (multiprocessing's resource tracker ignores the signals)
    assert all(os.getsid(p.pid) == srv.proc.pid for p in engine)  # (the same session: autogroups)
    results: list = []
    streams = [open_stream(http, srv.base_url, results, max_tokens=1500, ignore_eos=True) for _ in range(2)]
    wait_streaming(streams, srv, results)
    os.killpg(srv.proc.pid, signal.SIGINT)
    for s in streams:
        s.thread.join(120)
    assert srv.wait(60) == 0, srv.log_tail()
    assert len(results) == 2
    for kind, status, lines in results:
        assert kind == "ok" and status == 200
        assert lines[-1] == "data: [DONE]"
        finishes = [json.loads(l[6:])["choices"][0].get("finish_reason") for l in lines
                    if l.startswith("data: {") and json.loads(l[6:]).get("choices")]
        assert finishes[-1] == "length" and '"error"' not in lines[-2], lines[-3:]  # ran to its end


def test_drain_timeout_ends_streams_with_error_event(tiny_model, tmp_path, http):
    srv = start(tiny_model, tmp_path, "--drain-timeout", "1")
    results: list = []
    streams = [open_stream(http, srv.base_url, results, **LONG) for _ in range(2)]
    wait_streaming(streams, srv, results)  # both streams are running in the server
    t0 = time.monotonic()
    srv.signal(signal.SIGTERM)
    assert srv.wait(60) == 0
    assert time.monotonic() - t0 < 20
    for s in streams:
        s.thread.join(30)
    for kind, status, lines in results:
        assert kind == "ok"
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["error"]["code"] == "service_unavailable"


def test_sigterm_while_the_model_loads_exits_at_once(tiny_model, tmp_path, http):
    """Loading runs in a thread that nothing interrupts: the process must not wait for it
    (a pod deleted while loading would run out its grace period and be killed)."""
    srv = ServerProcess(["--model", str(tiny_model("qwen2-vl")), "--max-model-len", "4096"], tmp_path / "server.log")
    _STARTED.append(srv)
    srv.launch()
    deadline = time.monotonic() + 120
    while True:  # until the server answers and says it is loading
        assert srv.proc.poll() is None and time.monotonic() < deadline, srv.log_tail()
        try:
            if http.get(srv.base_url + "/health", timeout=1).json()["status"] == "loading":
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    ready = http.get(srv.base_url + "/ready", timeout=5)  # (a probe may come back in a moment)
    assert ready.status_code == 503 and ready.headers["retry-after"] == "1"
    assert ready.json()["status"] == "loading"
    models = http.get(srv.base_url + "/v1/models", timeout=5).json()["data"]  # (served while loading)
    assert [(m["id"], m["max_model_len"]) for m in models] == [(str(tiny_model("qwen2-vl")), 4096)]
    t0 = time.monotonic()
    srv.signal(signal.SIGTERM)
    assert srv.wait(30) == 0, srv.log_tail()
    assert time.monotonic() - t0 < 10
    deadline = time.monotonic() + 10  # (killed children may take a moment to be gone)
    while left := [p for p in psutil.process_iter() if _session_of(p) == srv.proc.pid and not _zombie(p)]:
        assert time.monotonic() < deadline, left  # no engine process outlives it
        time.sleep(0.1)


def _zombie(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _session_of(p: psutil.Process) -> int | None:
    try:
        return os.getsid(p.pid)
    except (ProcessLookupError, PermissionError):
        return None


def test_second_sigterm_exits_at_once(tiny_model, tmp_path, http):
    srv = start(tiny_model, tmp_path, "--drain-timeout", "300", "--engine-core-cpus", "workers")
    assert_cpu_split(srv, "workers")
    results: list = []
    wait_streaming([open_stream(http, srv.base_url, results, **LONG)], srv, results)
    srv.signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while request_from_child("GET", srv.base_url + "/ready")[0] != 503:  # the first one is being handled
        assert time.monotonic() < deadline, srv.log_tail()
    t0 = time.monotonic()
    srv.signal(signal.SIGTERM)
    assert srv.wait(30) == 1
    assert time.monotonic() - t0 < 5
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(srv.port) in " ".join(p.info["cmdline"] or [])]


def test_dead_engine_core_is_reported_and_process_exits(tiny_model, tmp_path, http):
    """A stream under way ends with an error event; one still waiting for its first token
    (queued in the engine: one sequence at a time here) gets a plain 503, which the SDKs
    retry and a proxy passes to another replica."""
    srv = start(tiny_model, tmp_path, "--max-num-seqs", "1")
    results: list = []
    stream = open_stream(http, srv.base_url, results, **LONG)
    wait_streaming([stream], srv, results)
    queued: list = []
    waiting = open_stream(http, srv.base_url, queued, **LONG)
    time.sleep(2)  # (taken in and handed to the engine in milliseconds; the first stream runs for seconds)
    assert not waiting.started.is_set() and stream.thread.is_alive(), srv.log_tail(20)
    cores = [p for p in psutil.Process(srv.proc.pid).children(recursive=True)
             if "EngineCore" in " ".join(p.cmdline() + [p.name()])]
    assert cores, "no engine core process found"
    for p in cores:
        p.kill()
    saw_503 = False
    deadline = time.monotonic() + 30
    while srv.proc.poll() is None and time.monotonic() < deadline:
        try:
            if http.get(srv.base_url + "/health", timeout=1).status_code == 503:
                saw_503 = True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    code = srv.wait(30)
    assert code != 0
    stream.thread.join(30)
    assert results and results[0][0] == "ok", f"{results}\n{srv.log_tail(30)}"
    kind, status, lines = results[0]
    assert lines[-1] == "data: [DONE]"
    err = json.loads(lines[-2][6:])["error"]
    assert err["code"] == "service_unavailable" and "Traceback" not in lines[-2]
    assert saw_503 or code != 0
    waiting.thread.join(30)
    assert queued and queued[0][:2] == ("ok", 503), f"{queued}\n{srv.log_tail(30)}"
    assert json.loads("".join(queued[0][2]))["error"]["code"] == "service_unavailable"


def test_a_frozen_engine_core_is_taken_for_hung_and_the_process_exits(tiny_model, tmp_path, http):
    """An engine core that stops (SIGSTOP here; a hung device or a deadlock alike) is not
    dead to vLLM: past --engine-stall-timeout without output the server fails its requests
    and exits non-zero (/health says 503 meanwhile: the scripted test in test_robustness.py),
    and leaves no engine process behind."""
    srv = start(tiny_model, tmp_path, "--engine-stall-timeout", "3")
    results: list = []
    stream = open_stream(http, srv.base_url, results, **LONG)
    wait_streaming([stream], srv, results)
    family = psutil.Process(srv.proc.pid).children(recursive=True)
    cores = [p for p in family if "EngineCore" in " ".join(p.cmdline() + [p.name()])]
    assert cores, "no engine core process found"
    for p in cores:
        p.suspend()
    code = srv.wait(40)
    assert code != 0
    stream.thread.join(30)
    assert results and results[0][0] == "ok", f"{results}\n{srv.log_tail(30)}"
    lines = results[0][2]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["error"]["code"] == "service_unavailable"
    assert "taking it for hung" in srv.log_tail(200)
    deadline = time.monotonic() + 25
    while left := [p for p in family if p.is_running() and not _zombie(p)]:
        assert time.monotonic() < deadline, left
        time.sleep(0.2)


def test_an_engine_core_outlives_no_killed_server(tiny_model, tmp_path, http):
    """SIGKILL (or the OOM killer) gives the server no chance to stop its engine core, which
    ran on, with its model workers, as an orphan holding their memory."""
    srv = start(tiny_model, tmp_path)
    engine = [p for p in psutil.Process(srv.proc.pid).children(recursive=True)]
    assert any("EngineCore" in " ".join(p.cmdline() + [p.name()]) for p in engine), engine
    srv.signal(signal.SIGKILL)
    srv.wait(10)
    deadline = time.monotonic() + 25  # a second's poll, then vLLM's own shutdown
    while left := [p for p in engine if p.is_running() and not _zombie(p)]:
        assert time.monotonic() < deadline, left
        time.sleep(0.2)
