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

import httpx


def shared_client(timeout: float = 120) -> httpx.Client:
    """A client with keep-alive off: every request still opens its own connection, as the
    module-level `httpx` functions do, so a server that closes idle connections (a replica
    going away, nginx's keepalive timeout) cannot fail a request on a stale one."""
    return httpx.Client(timeout=timeout, trust_env=False, limits=httpx.Limits(max_keepalive_connections=0))
