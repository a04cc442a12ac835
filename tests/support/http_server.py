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


def raw(data: bytes, close: bool = True) -> Route:
    """Write `data` as the whole answer (status line and all), then close the connection."""

    def handle(h: BaseHTTPRequestHandler) -> None:
        h.wfile.write(data)
        h.wfile.flush()
        h.close_connection = close

    return handle


def silent(seconds: float) -> Route:
    """Accept the request and answer nothing for `seconds`."""

    def handle(h: BaseHTTPRequestHandler) -> None:
        time.sleep(seconds)
        h.close_connection = True

    return handle


@dataclass
class LocalServer:
    host: str
    port: int
    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    #: The client's (address, port) of each request, in the order of `requests`.
    peers: list[tuple[str, int]] = field(default_factory=list)
    scheme: str = "http"

    def url(self, path: str, host: str | None = None) -> str:
        return f"{self.scheme}://{host or self.host}:{self.port}{path}"


def start_server(host: str, wrap_socket: Callable | None = None,
                 keep_alive: bool = False) -> tuple[LocalServer, ThreadingHTTPServer]:
    """Serve `state.routes` on `host`, a free port. `keep_alive`: answer as HTTP/1.1 and keep
    connections open between requests (routes must then send a Content-Length)."""
    state = LocalServer(host, 0)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"

        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            state.requests.append((self.path, dict(self.headers)))
            state.peers.append(self.client_address[:2])
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
