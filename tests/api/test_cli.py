"""`qwen-vl-serve` start-up failures that need no engine."""

from __future__ import annotations

import socket
import subprocess
import sys
import time


def test_a_taken_port_fails_fast_before_the_engine_loads(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "server.cli", "--model", str(tmp_path / "no-such-model"),
             "--host", "127.0.0.1", "--port", str(port)],
            capture_output=True, text=True, timeout=120,
        )
        elapsed = time.monotonic() - started
    assert proc.returncode != 0  # uvicorn exits 3 on a start-up failure
    assert "address already in use" in proc.stderr.lower()
    assert "engine" not in proc.stderr.lower()  # nothing was loaded
    assert elapsed < 60
