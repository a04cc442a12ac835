"""The /health probe of the load generator: a child process, on a new connection each time,
in a session of its own."""

from __future__ import annotations

import time

from clients.probe import HealthProbe
from support.http_server import start_server, static


def test_the_probe_measures_each_answer_from_its_own_session():
    state, httpd = start_server("127.0.0.1")
    state.routes["/health"] = static(b'{"status": "ok"}', "application/json")
    try:
        with HealthProbe(state.url("/health"), interval=0.02) as probe:
            time.sleep(0.6)
        result = probe.result
        assert result.errors == 0
        assert len(result.latencies) >= 5
        assert all(0 < latency < 2 for latency in result.latencies)
        assert result.own_session
        with HealthProbe(state.url("/missing"), interval=0.02) as probe:
            time.sleep(0.3)
        assert probe.result.errors >= 3 and not probe.result.latencies  # a 404 is no answer
    finally:
        httpd.shutdown()

