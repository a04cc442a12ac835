"""A threaded HTTP server on a loopback address with programmable routes (image URLs for
tests). Loopback only: tests never send traffic anywhere else."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Route = Callable[[BaseHTTPRequestHandler], None]


def static(body: bytes, content_type: str = "application/octet-stream", status: int = 200,
           length: bool = True) -> Route:
    def handle(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        if length:
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return handle


def redirect(location: str, status: int = 302) -> Route:
    def handle(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return handle


def drip(total: int = 200, interval: float = 0.1) -> Route:
    """Headers at once, then one byte every `interval` seconds."""

    def handle(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Content-Length", str(total))
        h.end_headers()
        try:
            for _ in range(total):
                h.wfile.write(b"\x00")
                h.wfile.flush()
                time.sleep(interval)
        except OSError:
            pass  # the client gave up, as it should

    return handle


@dataclass
class LocalServer:
    host: str
    port: int
    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    scheme: str = "http"

    def url(self, path: str, host: str | None = None) -> str:
        return f"{self.scheme}://{host or self.host}:{self.port}{path}"


def start_server(host: str, wrap_socket: Callable | None = None) -> tuple[LocalServer, ThreadingHTTPServer]:
    state = LocalServer(host, 0)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            state.requests.append((self.path, dict(self.headers)))
            route = state.routes.get(self.path)
            if route is None:
                static(b"not found", "text/plain", 404)(self)
            else:
                route(self)

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer((host, 0), Handler)
    httpd.daemon_threads = True
    if wrap_socket is not None:
        httpd.socket = wrap_socket(httpd.socket)
        state.scheme = "https"
    state.port = httpd.server_address[1]
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return state, httpd
