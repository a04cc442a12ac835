"""A static HTTP server for benchmark pictures, in a child process, on a loopback address
(127.0.0.2 by default, so an API server can allow exactly that address for image URLs).

Files are held in memory and served with Content-Length; anything else is a 404.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

#: The address the benchmark image server binds (loopback, distinct from the API server's).
DEFAULT_HOST = "127.0.0.2"


def free_port(host: str) -> int:
    """A port free on `host` right now (the OS's pick)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _serve(host: str, port: int, files: dict[str, tuple[bytes, str]], ready, stop) -> None:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a CDN would

        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            found = files.get(self.path.split("?", 1)[0])
            status, (body, ctype) = (200, found) if found else (404, (b"not found", "text/plain"))
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer((host, port), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    ready.send(httpd.server_address[1])
    parent = os.getppid()
    while not stop.wait(0.5):
        if os.getppid() != parent:  # the load generator was killed: nobody will say stop
            break
    httpd.shutdown()
    httpd.server_close()


class ImageServer:
    """`with ImageServer(files) as srv: srv.base_url` — serves `files` (path -> (bytes,
    content type)) until the block ends. The port (given, or picked when the object is
    made) is known before the server starts, so request bodies can name it. Raises
    RuntimeError if the child does not come up within `start_timeout` seconds (e.g. the
    address cannot be bound)."""

    def __init__(self, files: dict[str, tuple[bytes, str]] | None = None, host: str = DEFAULT_HOST,
                 port: int = 0, start_timeout: float = 30.0) -> None:
        self.files = files or {}
        self.host = host
        self.port = port or free_port(host)
        self.start_timeout = start_timeout
        self._ctx = mp.get_context("spawn")

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "ImageServer":
        recv, send = self._ctx.Pipe(duplex=False)
        self._stop = self._ctx.Event()
        self._proc = self._ctx.Process(target=_serve, args=(self.host, self.port, self.files, send, self._stop), daemon=True)
        self._proc.start()
        send.close()
        if not recv.poll(self.start_timeout):
            self._halt()
            raise RuntimeError(f"image server on {self.host} did not start")
        try:
            recv.recv()
        except EOFError:
            self._halt()
            raise RuntimeError(f"image server on {self.host} failed to start (address not bindable?)") from None
        return self

    def __exit__(self, *exc) -> None:
        self._halt()

    def _halt(self) -> None:
        self._stop.set()
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
