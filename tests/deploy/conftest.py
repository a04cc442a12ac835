"""Real components for the deployment tests: qwen-vl-serve replicas on a tiny checkpoint and
Debian's nginx with the shipped configuration, all on loopback.

Everything here is bounded: every wait has a deadline, every process started is stopped in
the fixture's teardown, and nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from support.live_server import ServerProcess, free_port

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
NGINX_DIR = DEPLOY / "nginx"

READY_TIMEOUT_S = 300.0  # two CPU replicas starting at once on a shared 2-core machine
# Small admission limits so that one replica saturates with a handful of requests (429 test).
MAX_CONCURRENT = 2
MAX_QUEUED = 1
# Long enough for the drain test's stream to finish on a slow machine.
DRAIN_TIMEOUT_S = 90.0
SERVED_MODEL = "tiny"


def venv_tool(name: str) -> str | None:
    """A console script installed beside this interpreter (the project's venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name)


def require_tool(name: str, install_hint: str) -> str:
    """Path of a tool the test needs. In CI (CI=true) a missing tool fails the test, since
    a skip there would hide a missing install step; elsewhere it skips."""
    path = venv_tool(name) or shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if path:
        return path
    message = f"{name} not found; {install_hint}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def wait_until(predicate, timeout: float, interval: float = 0.25, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Replica(ServerProcess):
    """One replica on a fixed loopback port (kept across restarts: nginx's list names it)."""

    def __init__(self, name: str, model_dir: Path, log_dir: Path, worker_cpu: int | None = None) -> None:
        """`worker_cpu`: the core vLLM binds this replica's model worker to (its default
        is the first allowed core, the same for every replica on the machine)."""
        super().__init__(
            [
                "--model", str(model_dir),
                "--served-model-name", SERVED_MODEL,
                "--max-concurrent-requests", str(MAX_CONCURRENT),
                "--max-queued-requests", str(MAX_QUEUED),
                "--drain-timeout", str(DRAIN_TIMEOUT_S),
            ],
            log_path=log_dir / f"{name}.log",
            env={} if worker_cpu is None else {"VLLM_CPU_OMP_THREADS_BIND": str(worker_cpu)},
            # In the test's own scheduling group (autogroup), not one per replica: across
            # groups, a process sharing a core with the other replica's model worker (which
            # polls with sched_yield between steps) was seen getting no CPU at all for 60-100 s
            # while runnable (a replica's engine stalled mid-stream, or its exit after a drain).
            own_session=False,
        )
        self.name = name
        self.addr = f"{self.host}:{self.port}"

    def start(self, timeout: float = READY_TIMEOUT_S) -> "Replica":
        super().start(timeout)
        # On a 2-core machine the engines' busy threads can starve the test's client for
        # seconds, which then sees a stream arrive in one burst although nginx passed it on
        # chunk by chunk. A lower priority for the replica (all its threads: the process
        # group) keeps the client's timings honest.
        for group in {self.proc.pid, *self.groups}:  # (the engine core leads one of its own)
            os.setpriority(os.PRIO_PGRP, group, 10)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill_all(self) -> None:
        """SIGKILL the replica with its engine processes: a crashed pod or host."""
        assert self.proc is not None
        self.signal_groups(signal.SIGKILL)
        self.proc.wait(timeout=10)


def render_nginx(workdir: Path, listen_port: int, upstream_addrs: list[str]) -> Path:
    """Write a main nginx.conf under `workdir` around the shipped deploy/nginx files.

    The shipped qwen-vl-serve.conf is used unchanged except for its `listen` line (a loopback
    test port instead of 80); the upstream list is written in the shipped upstreams.conf's
    place, with the shipped per-server parameters (max_fails, fail_timeout). The access log
    uses the shipped `qwenvl` format, which records the replica that answered each request.
    """
    site = (NGINX_DIR / "qwen-vl-serve.conf").read_text()
    site, n = re.subn(r"^(\s*)listen\s+80;", rf"\1listen 127.0.0.1:{listen_port};", site, flags=re.M)
    assert n == 1, "expected exactly one `listen 80;` in deploy/nginx/qwen-vl-serve.conf"
    (workdir / "qwen-vl-serve.conf").write_text(site)

    shipped = (NGINX_DIR / "upstreams.conf").read_text()
    m = re.search(r"^\s*server\s+\S+\s+([^;]*);", shipped, flags=re.M)
    assert m, "deploy/nginx/upstreams.conf has no `server` line"
    params = m.group(1)
    (workdir / "qwen-vl-serve").mkdir(exist_ok=True)
    (workdir / "qwen-vl-serve" / "upstreams.conf").write_text(
        "".join(f"server {addr} {params};\n" for addr in upstream_addrs))

    temp = {name: workdir / "temp" / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for path in temp.values():
        path.mkdir(parents=True, exist_ok=True)
    # As root, nginx's workers would switch to `nobody`, which cannot write the temp
    # directories under pytest's private tmp directory.
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = workdir / "nginx.conf"
    conf.write_text(f"""{user}daemon off;
worker_processes 2;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log info;
events {{ worker_connections 512; }}
http {{
    client_body_temp_path {temp['body']};
    proxy_temp_path {temp['proxy']};
    fastcgi_temp_path {temp['fastcgi']};
    uwsgi_temp_path {temp['uwsgi']};
    scgi_temp_path {temp['scgi']};
    include {workdir}/qwen-vl-serve.conf;
    access_log {workdir}/access.log qwenvl;
}}
""")
    return conf


@dataclass
class LogEntry:
    status: int
    request_id: str
    upstreams: list[str]  # every replica tried, in order; the last one answered
    session: str


_LOG_RE = re.compile(r'" (?P<status>\d{3}) \d+ request_id=(?P<rid>\S+) upstream=(?P<up>.*?) '
                     r'upstream_status=.* session=(?P<session>\S*)$')


NGINX_HINT = "install Debian's nginx (apt-get install --no-install-recommends nginx); make install does, see deploy/README.md"


class Nginx:
    """Debian's nginx running the rendered configuration in the foreground."""

    def __init__(self, workdir: Path, upstream_addrs: list[str]) -> None:
        self.binary = require_tool("nginx", NGINX_HINT)
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.conf = render_nginx(workdir, self.port, upstream_addrs)
        self.proc: subprocess.Popen | None = None

    def _args(self) -> list[str]:
        return [self.binary, "-p", str(self.workdir), "-c", str(self.conf), "-e", str(self.workdir / "error.log")]

    def check(self) -> None:
        out = subprocess.run(self._args() + ["-t"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr

    def start(self) -> None:
        self.check()
        self.proc = subprocess.Popen(self._args(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def listening() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {log_tail(self.workdir / 'error.log')}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(listening, 20, what="nginx to listen")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: let workers finish
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def log_entries(self) -> dict[str, LogEntry]:
        """Access-log entries by request id."""
        entries = {}
        path = self.workdir / "access.log"
        if not path.exists():
            return entries
        for line in path.read_text().splitlines():
            m = _LOG_RE.search(line)
            if m:
                # $upstream_addr separates tries with ", " (and groups with " : ")
                ups = [u for u in re.split(r",\s*|\s:\s", m.group("up")) if u and u != "-"]
                entries[m.group("rid")] = LogEntry(int(m.group("status")), m.group("rid"), ups,
                                                   m.group("session"))
        return entries

    def entry(self, request_id: str, timeout: float = 5.0) -> LogEntry:
        """The access-log entry of one request (nginx logs when the response is done, which
        can be a moment after the client saw the last byte)."""
        found: dict[str, LogEntry] = {}

        def logged() -> bool:
            found.update(self.log_entries())
            return request_id in found

        wait_until(logged, timeout, interval=0.05, what=f"access log entry {request_id}")
        return found[request_id]


class Cluster:
    """Two replicas behind nginx. `ensure_up()` restarts replicas an earlier test stopped."""

    max_concurrent = MAX_CONCURRENT
    max_queued = MAX_QUEUED
    drain_timeout = DRAIN_TIMEOUT_S
    served_model = SERVED_MODEL

    def __init__(self, model_dir: Path, workdir: Path) -> None:
        self.model_dir = model_dir
        self.workdir = workdir
        # Each replica's worker on a core of its own where there are two: left to vLLM, both
        # workers share the first core and the other core takes both front ends and engine
        # cores, while a replica on its own machine would have one of each per core.
        cpus = sorted(os.sched_getaffinity(0))
        self.replicas = [Replica(f"replica-{i}", model_dir, workdir, cpus[i] if len(cpus) >= 2 else None)
                         for i in range(2)]
        (workdir / "nginx").mkdir(exist_ok=True)
        self.nginx = Nginx(workdir / "nginx", [r.addr for r in self.replicas])

    def ensure_up(self) -> None:
        down = [r for r in self.replicas if not r.alive()]
        restarted = [r for r in down if r.proc is not None]
        for r in restarted:
            r.stop()
        # Started at once: a replica's start is mostly CPU-bound engine set-up.
        with ThreadPoolExecutor(len(self.replicas)) as pool:
            list(pool.map(lambda r: r.start(READY_TIMEOUT_S), down))
        for r in restarted:
            self._readmit(r)

    def _readmit(self, replica: Replica, timeout: float = 90.0) -> None:
        """Route requests through nginx until both upstream groups use `replica` again.

        nginx takes back a replica it ejected (max_fails) only after fail_timeout, through one
        successful request in each upstream group; until then the replica gets no other work.
        An operator restarting replicas one by one waits for this too (deploy/README.md).
        """
        m = re.search(r"fail_timeout=(\d+)s", (NGINX_DIR / "upstreams.conf").read_text())
        time.sleep((float(m.group(1)) if m else 10.0) + 1)
        pending = {"least_conn", "session"}
        deadline = time.monotonic() + timeout
        for i in range(10_000):
            if not pending:
                return
            assert time.monotonic() < deadline, f"nginx did not take back {replica.addr}: {pending}"
            for group in sorted(pending):
                rid = f"readmit-{group}-{i}"
                headers = {"X-Request-Id": rid}
                if group == "session":
                    headers["X-Session-ID"] = f"readmit-{i}"
                response = httpx.post(f"{self.nginx.url}/v1/chat/completions", headers=headers, timeout=60,
                                      json={"model": SERVED_MODEL, "max_tokens": 1,
                                            "messages": [{"role": "user", "content": "hi"}]})
                if response.status_code == 200 and self.nginx.entry(rid).upstreams[-1] == replica.addr:
                    pending.discard(group)

    def stop(self) -> None:
        self.nginx.stop()
        for r in self.replicas:
            r.stop()


@pytest.fixture(scope="session")
def find_tool():
    """`require_tool(name, install_hint)`: a tool's path; fails in CI, skips elsewhere."""
    return require_tool


@pytest.fixture(scope="session")
def nginx_binary() -> str:
    return require_tool("nginx", NGINX_HINT)


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory) -> Iterator[Cluster]:
    """nginx and two replicas of the tiny Qwen2-VL model, started once per module."""
    c = Cluster(tiny_model("qwen2-vl"), tmp_path_factory.mktemp("nginx-cluster"))
    try:
        c.nginx.start()
        c.ensure_up()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def lonely_nginx(tmp_path_factory) -> Iterator[Nginx]:
    """nginx with the shipped configuration whose only replica is down (nothing listens on
    its port): for the answers nginx makes itself."""
    nginx = Nginx(tmp_path_factory.mktemp("nginx-lonely"), [f"127.0.0.1:{free_port()}"])
    nginx.start()
    try:
        yield nginx
    finally:
        nginx.stop()
