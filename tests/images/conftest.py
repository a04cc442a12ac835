"""Fixtures for the image tests: image servers on loopback addresses only.

`image_server` listens on 127.0.0.2 (the one address the tests allow with
--image-allow-networks 127.0.0.2/32). `canary_server` listens on 127.0.0.1 and must never
be reached: the forbidden-address tests point at it and check it saw no request.
"""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler

import pytest

import image_samples as samples
from image_helpers import ALLOWED_HOST, CANARY_HOST
from support.http_server import drip, redirect, start_server, static


def gzip_route(h: BaseHTTPRequestHandler) -> None:
    """Claims a gzip Content-Encoding (which the fetcher asked not to get)."""
    body = samples.png()
    h.send_response(200)
    h.send_header("Content-Type", "image/png")
    h.send_header("Content-Encoding", "gzip")
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


@pytest.fixture(scope="session")
def image_server():
    state, httpd = start_server(ALLOWED_HOST)
    images = {
        "/red.png": static(samples.png(64, 48, (255, 0, 0)), "image/png"),
        "/blue.png": static(samples.png(32, 32, (0, 0, 255)), "image/png"),
        "/photo.jpg": static(samples.noise_jpeg(640, 480), "image/jpeg"),
        "/bomb.png": static(samples.bomb_png(), "image/png"),
        "/header-bomb.png": static(samples.header_bomb_png(), "image/png"),
        "/truncated.jpg": static(samples.noise_jpeg(256, 256)[:3000], "image/jpeg"),
        "/truncated.png": static(samples.png(256, 256, (1, 2, 3))[:-40], "image/png"),
        "/random.png": static(samples.random_bytes(), "image/png"),
        "/page.png": static(samples.HTML, "image/png"),
        "/page.html": static(samples.HTML, "text/html"),
        "/image.svg": static(samples.SVG, "image/svg+xml"),
        "/frames.gif": static(samples.animated_gif(5000), "image/gif"),
        "/cmyk.jpg": static(samples.cmyk_jpeg(), "image/jpeg"),
        "/16bit.png": static(samples.png16_rgb(8, 8, (65535, 0, 32768)), "image/png"),
        "/rotated.jpg": static(samples.rotated_jpeg(), "image/jpeg"),
        "/1x1.png": static(samples.png(1, 1), "image/png"),
        "/1x10000.png": static(samples.png(1, 10000), "image/png"),
        "/big.bin": static(b"\x00" * 300_000, "image/png"),
        "/big-chunked.bin": static(b"\x00" * 300_000, "image/png", length=False),
        "/drip.png": drip(),
        "/missing-redirect": redirect("/does-not-exist"),
        "/redirect-ok": redirect("/red.png"),
        "/redirect-loop": redirect("/redirect-loop"),
        "/redirect-ftp": redirect("ftp://127.0.0.2/red.png"),
        "/redirect-file": redirect("file:///etc/passwd"),
    }

    images["/gzip.png"] = gzip_route
    state.routes.update(images)
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="session")
def canary_server():
    state, httpd = start_server(CANARY_HOST)
    state.routes["/red.png"] = static(samples.png(), "image/png")
    yield state
    httpd.shutdown()
    httpd.server_close()


