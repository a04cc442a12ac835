"""Run `qwen-vl-serve` as a real process on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from clients.servers import lower_session_priority, signal_session


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """`qwen-vl-serve` in a subprocess. `start()` waits until /ready answers 200."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None,
                 host: str = "127.0.0.1", nice: int = 5, own_session: bool = True) -> None:
        """`own_session`: the server leads a session of its own (a scheduling group of its
        own under the kernel's autogroups, given `nice` as a whole), else only a process
        group of its own within the test's session, its processes at `nice` each."""
        self.host = host
        self.port = free_port(host)
        self.args = args
        self.log_path = log_path
        # A quarter GiB holds 128K tokens of the tiny Qwen-VL (512K of the others), more
        # than any test asks for; vLLM zeroes the cache at startup, about 11 s per GiB here.
        self.env = {**os.environ, "QWENVL_KV_CACHE_SPACE_GIB": "0.25", **(env or {})}
        self.proc: subprocess.Popen | None = None
        # On a 2-core machine a busy server (and its engine) can starve the test's own
        # client threads; a lower priority keeps the test's timing meaningful.
        self.nice = nice
        self.own_session = own_session
        #: The process groups of the server and its engine processes, once it is ready (the
        #: engine core leads one of its own: server.engine.parent_watch).
        self.groups: set[int] = set()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 240.0) -> "ServerProcess":
        self.launch()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.base_url + "/ready", timeout=2).status_code == 200:
                    self.groups = process_groups(self.proc.pid)
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log_tail()}")

    def launch(self) -> "ServerProcess":
        """Start the process and return at once (`start` also waits until it is ready)."""
        log = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", "server.cli", "--host", self.host, "--port", str(self.port), *self.args]
        nice = self.nice
        group = {"start_new_session": True} if self.own_session else {"process_group": 0}
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     preexec_fn=lambda: os.nice(nice), **group)
        if self.own_session:
            # The session too, not only its processes: the test's own threads (a poller next
            # to a few stream readers) were measured stalling for 11 s without it.
            lower_session_priority(self.proc.pid, nice)
        return self

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """SIGTERM and up to 30 s to exit, then SIGKILL for whatever is left of the server's
        session (or, not in a session of its own, of its process groups): also after a clean
        exit (or one a test caused), since an engine process left behind would keep a core
        busy under the tests that follow."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        if self.own_session:
            signal_session(self.proc.pid, signal.SIGKILL)
        else:
            self.signal_groups(signal.SIGKILL)
        self.proc.wait(10)

    def signal_groups(self, sig: int) -> None:
        """`sig` to the server's process group and to those its engine processes had when it
        became ready."""
        assert self.proc is not None
        for group in {self.proc.pid, *self.groups}:
            try:
                os.killpg(group, sig)
            except (ProcessLookupError, PermissionError):
                pass


def process_groups(pid: int) -> set[int]:
    """The process groups of process `pid` and its descendants."""
    groups = set()
    try:
        family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return groups
    for proc in family:
        try:
            groups.add(os.getpgid(proc.pid))
        except (ProcessLookupError, PermissionError):
            pass
    return groups


def process_report() -> str:
    """The machine's servers, engines and workers as `ps` sees them (state, CPU share, core,
    priority): for failure messages, where a stalled replica is often a starved one."""
    out = subprocess.run(["ps", "-eo", "pid,ppid,pgid,ni,stat,pcpu,psr,etime,comm"],
                         capture_output=True, text=True, timeout=10).stdout.splitlines()
    keep = [line for line in out[1:] if re.search(r"python|VLLM|nginx|pytest", line)]
    return "\n".join(out[:1] + keep)
