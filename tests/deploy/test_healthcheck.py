"""The container's HEALTHCHECK, `qwen-vl-healthcheck` (server/healthcheck.py): it finds the
server's own arguments and asks the address they name, against a real HTTP server (the
scripted engine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.healthcheck import health_url, main, server_argv
from support.app_server import scripted_server
from support.live_server import free_port


def fake_proc(tmp_path: Path, processes: dict[int, list[str]]) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    for pid, argv in processes.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (tmp_path / "self").mkdir()  # (not a pid)
    return tmp_path


def test_the_servers_arguments_are_found_behind_the_containers_init(tmp_path):
    proc = fake_proc(tmp_path, {
        1: ["tini", "--", "qwen-vl-serve", "--port", "9000", "--api-key", ""],
        12: ["/opt/venv/bin/python", "-c", "from multiprocessing.spawn import spawn_main"],
        30: ["/opt/venv/bin/qwen-vl-serve", "--port", "9999"],
    })
    assert server_argv(proc) == ["--port", "9000", "--api-key", ""]


def test_only_this_users_processes_count(tmp_path):
    """In a shared process namespace, another user's process must not name the address the
    check asks (and so receive a key)."""
    import os

    proc = fake_proc(tmp_path, {3: ["x", "qwen-vl-serve", "--port", "1"], 9: ["qwen-vl-serve", "--port", "2"]})
    assert server_argv(proc) == ["--port", "1"]  # (the fake tree is this user's)
    assert server_argv(proc, uid=os.getuid() + 1) is None
    if os.getuid() == 0:
        os.chown(proc / "3", 12345, -1)
        assert server_argv(proc) == ["--port", "2"]


def test_a_server_started_as_a_module_or_by_its_path_is_found(tmp_path):
    assert server_argv(fake_proc(tmp_path / "a", {
        5: ["sh", "-c", "sleep 1"],
        8: ["/usr/bin/python3", "-m", "server.cli", "--host", "10.0.0.5"],
    })) == ["--host", "10.0.0.5"]
    assert server_argv(fake_proc(tmp_path / "b", {7: ["/opt/venv/bin/qwen-vl-serve"]})) == []
    assert server_argv(fake_proc(tmp_path / "c", {7: ["nginx: master process"]})) is None


@pytest.mark.parametrize("host, url", [
    ("0.0.0.0", "http://127.0.0.1:8000/health"),
    ("::", "http://[::1]:8000/health"),
    ("[::]", "http://[::1]:8000/health"),
    ("10.1.2.3", "http://10.1.2.3:8000/health"),
    ("::1", "http://[::1]:8000/health"),
    ("serve.internal", "http://serve.internal:8000/health"),
])
def test_the_address_asked_is_where_the_server_listens(host, url):
    assert health_url(host, 8000) == url


@pytest.fixture(scope="module")
def srv(tiny_tokenizer):
    with scripted_server(tiny_tokenizer) as server:
        yield server


def test_a_server_on_the_port_its_flags_name_is_healthy(srv):
    assert main(["--port", str(srv.port)]) == 0
    assert main(["--port", str(free_port("127.0.0.1"))]) == 1  # nobody there


def test_the_port_may_come_from_the_environment(srv, monkeypatch, tmp_path):
    monkeypatch.setattr("server.healthcheck.server_argv", lambda: ["--model", "/models/x"])
    monkeypatch.setenv("QWENVL_PORT", str(srv.port))
    assert main([]) == 0
    monkeypatch.setenv("QWENVL_PORT", str(free_port("127.0.0.1")))
    assert main([]) == 1


def test_a_server_whose_probes_need_a_key_gets_one(tiny_tokenizer, capsys):
    with scripted_server(tiny_tokenizer, api_keys=["k1", "k2"], auth_health_endpoints=True) as server:
        port = str(server.port)
        assert main(["--port", port, "--api-key", "k2", "--auth-health-endpoints"]) == 0
        assert main(["--port", port, "--api-key", "wrong", "--auth-health-endpoints"]) == 1
        assert "401" in capsys.readouterr().err
        assert main(["--port", port]) == 1


def test_arguments_the_server_would_refuse_make_the_check_fail_not_crash(capsys):
    assert main(["--port", "not-a-port"]) == 1  # (Docker reserves exit status 2)
    assert "--port" in capsys.readouterr().err
