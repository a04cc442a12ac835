"""One httpx client for a test that reads streams in threads while it polls or sends more.

Building an httpx client builds an SSL context, which parses the whole CA bundle. That takes
about 30 ms in an idle process, but in a process whose other threads are reading SSE streams
at a few hundred events a second it was measured taking 2-6 s (each of its many GIL hand-offs
waits behind the readers). `httpx.get()`, `httpx.post()` and `httpx.stream()` build one per
call, so a test that polled /metrics with them while three streams ran saw its polls stall
for seconds and started a stream only after another had ended. A test that makes requests
from several threads shares one client built up front instead (httpx clients are
thread-safe).
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx


def shared_client(timeout: float = 120) -> httpx.Client:
    """A client with keep-alive off: every request still opens its own connection, as the
    module-level `httpx` functions do, so a server that closes idle connections (a replica
    going away, nginx's keepalive timeout) cannot fail a request on a stale one."""
    return httpx.Client(timeout=timeout, trust_env=False, limits=httpx.Limits(max_keepalive_connections=0))


_CHILD_REQUEST = r"""
import json, sys, urllib.error, urllib.request
method, url, body = sys.argv[1], sys.argv[2], sys.argv[3]
req = urllib.request.Request(url, method=method, data=body.encode() or None,
                             headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=float(sys.argv[4])) as r:
        status, headers = r.status, dict(r.headers)
except urllib.error.HTTPError as e:
    status, headers = e.code, dict(e.headers)
print(json.dumps({"status": status, "headers": {k.lower(): v for k, v in headers.items()}}))
"""


def request_from_child(method: str, url: str, body: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    """Make one request from a new Python process; return its status and lower-cased headers.

    For a test whose own threads are reading SSE streams: those threads hold the GIL for most
    of any request the test's main thread makes (CI saw polls take longer than 10-second
    streams), so a check that must land while the streams run is made by a process of its own.
    """
    out = subprocess.run([sys.executable, "-c", _CHILD_REQUEST, method, url, json.dumps(body) if body else "",
                          str(timeout)], capture_output=True, text=True, timeout=timeout + 30, check=True)
    answer = json.loads(out.stdout)
    return answer["status"], answer["headers"]
