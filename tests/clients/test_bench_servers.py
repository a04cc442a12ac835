"""Servers under comparison run below the load generator's priority (their sessions, or their
processes where the kernel has no autogroups),
and stopping one ends its whole process group."""

from __future__ import annotations

import os
import sys
import time

import psutil

from clients.servers import (
    SERVER_NICE,
    SERVER_PROCESS_NICE,
    ManagedServer,
    ServerSpec,
    autogroups_active,
    parse_autogroup,
    priority_warning,
    session_nice,
)

# A stand-in server: a process that starts a child (as a server starts its engine), then waits.
SLEEPER = ("import subprocess, sys, time; "
           "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)")


def _spec() -> ServerSpec:
    return ServerSpec("sleeper", [sys.executable, "-c", SLEEPER], "127.0.0.1", 9)


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
        own = psutil.Process().nice()
        if autogroups_active():  # the kernel schedules sessions as groups: lower the group only
            assert session_nice(server.pid) == SERVER_NICE
            assert proc.nice() == own  # its threads keep their production priorities
        else:
            assert proc.nice() == min(19, own + SERVER_PROCESS_NICE)
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
        if session_nice(os.getpid()) is not None:
            assert session_nice(server.pid) == 0
    finally:
        server.stop()


def test_autogroup_lines_parse_and_an_empty_file_means_no_autogroups():
    assert parse_autogroup("/autogroup-42 nice 5\n") == 5
    assert parse_autogroup("/autogroup-7 nice -3") == -3
    assert parse_autogroup("") is None  # CI's sandbox shows the file empty
    assert session_nice(2**22 + 12345) is None  # no such process


def test_a_client_session_not_below_the_servers_is_flagged():
    assert priority_warning(0) is None
    assert priority_warning(None) is None  # no autogroups: plain nice values decide
    warning = priority_warning(5)  # 10 below the servers' 15: the client was measured waiting at 5 below
    assert warning and "nice 5" in warning and "echo 0 > /proc/$$/autogroup" in warning
    assert priority_warning(-3) is None
    assert priority_warning(7, server_nice=5)
    assert priority_warning(5, server_nice=0) is None  # servers not lowered: nothing to compare
