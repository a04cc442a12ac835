"""Servers under comparison run below the load generator's priority (process and session),
and stopping one ends its whole process group."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import psutil

from clients.servers import SERVER_NICE, ManagedServer, ServerSpec

# A stand-in server: a process that starts a child (as a server starts its engine), then waits.
SLEEPER = ("import subprocess, sys, time; "
           "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)")


def _spec() -> ServerSpec:
    return ServerSpec("sleeper", [sys.executable, "-c", SLEEPER], "127.0.0.1", 9)


def _autogroup_nice(pid: int) -> int | None:
    """The nice value of `pid`'s autogroup ("/autogroup-42 nice 5"), None without autogroups."""
    try:
        text = Path(f"/proc/{pid}/autogroup").read_text()
    except OSError:
        return None
    # Some sandboxes (seen on CI) have the file but leave it empty: no autogroups there either.
    match = re.search(r"nice\s+(-?\d+)", text)
    return int(match.group(1)) if match else None


def _children(proc: psutil.Process, timeout: float = 10) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while not proc.children() and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc.children()


def test_server_runs_below_the_client_and_stop_ends_its_group(tmp_path):
    server = ManagedServer(_spec(), tmp_path / "log", stop_timeout=5).start()
    proc = psutil.Process(server.pid)
    try:
        assert os.getsid(server.pid) == server.pid  # a session of its own
        assert proc.nice() == min(19, psutil.Process().nice() + SERVER_NICE)
        if _autogroup_nice(os.getpid()) is not None:  # the kernel schedules sessions as groups
            assert _autogroup_nice(server.pid) == SERVER_NICE
        children = _children(proc)
        assert children, "the stand-in server did not start its child"
    finally:
        server.stop()
    assert not proc.is_running()
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive


def test_nice_zero_leaves_priority_alone(tmp_path):
    server = ManagedServer(_spec(), tmp_path / "log", stop_timeout=5, nice=0).start()
    try:
        assert psutil.Process(server.pid).nice() == psutil.Process().nice()
        if _autogroup_nice(os.getpid()) is not None:
            assert _autogroup_nice(server.pid) == 0
    finally:
        server.stop()
