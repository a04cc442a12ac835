"""uvicorn's HTTP/1.1 protocol (httptools) with limits on the request head.

uvicorn bounds neither the size of a request's head nor the time it may take to arrive:
httptools buffers a header until it is complete (a 100 MB header was accepted, and parsing
a 60 MB one stopped the event loop for 2 s), and a connection that sends a partial head, or
nothing, is held open for as long as the client likes (slowloris). A load balancer in front
(deploy/nginx) enforces both; these limits keep a server that is reached directly safe too.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


#: How long a refused connection is kept reading (and dropping) input after its answer.
_LINGER_SECONDS = 2.0


def _error_body(message: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                 "param": None, "code": code}}).encode()


def _framed(status: int, reason: str, body: bytes) -> bytes:
    """A whole HTTP/1.1 response carrying `body` (JSON), after which the connection ends."""
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


def guarded_protocol(max_header_bytes: int, header_timeout: float) -> type[HttpToolsProtocol]:
    """A protocol class for `uvicorn.Config(http=...)`.

    - A request head (request line and headers) larger than `max_header_bytes` gets a 431
      and the connection is closed, with at most one read's worth (256 KiB) buffered past it.
    - A head must be complete within `header_timeout` seconds of its first byte, and a new
      connection must send one within that time; otherwise 408 (if anything arrived) and
      the connection is closed. Idle keep-alive connections keep uvicorn's own timeout.
    - Bytes that are not HTTP get a JSON 400 like every other refusal (uvicorn's is text).
    """
    too_large_body = _error_body(
        f"The request's headers exceed this server's limit of {max_header_bytes} bytes.", "headers_too_large")
    too_large = _framed(431, "Request Header Fields Too Large", too_large_body)
    too_slow = _framed(408, "Request Timeout", _error_body(
        f"The request's headers did not arrive within {header_timeout:g} seconds.", "header_timeout"))

    async def _refuse_head(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 431, "headers": [
            (b"content-type", b"application/json"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": too_large_body})

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _head_bytes = 0
        _in_head = False
        _head_timer: asyncio.TimerHandle | None = None
        _refused = False
        _head_size = 0

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return  # what a refused client still sends is read and dropped (see _refuse)
            super().data_received(data)
            if self._in_head:
                # Still inside a head after this read. (A read that also held the end of the
                # message before it is counted whole: at most one read too many.)
                self._head_bytes += len(data)
                if self._head_bytes > max_header_bytes and not self.transport.is_closing():
                    self._refuse(too_large)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head = True
            self._head_bytes = 0  # bytes read while the head was incomplete
            self._head_size = 0  # the head's request target and headers, as parsed
            if self._head_timer is None:
                self._arm_head_timer()

        def on_url(self, url: bytes) -> None:
            self._head_size += len(url)
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._head_size += len(name) + len(value) + 4  # ": " and CRLF
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._disarm_head_timer()
            if self._head_size <= max_header_bytes:
                super().on_headers_complete()
                return
            # A head that arrived whole in one read: answered by uvicorn's own request cycle,
            # with an app that refuses it instead of ours.
            app, self.app = self.app, _refuse_head
            try:
                super().on_headers_complete()
            finally:
                self.app = app

        def send_400_response(self, msg: str) -> None:
            # uvicorn's answer to bytes its parser refuses (a bad request line, header or
            # framing): the same words, as the JSON error every other refusal is.
            self._refuse(_framed(400, "Bad Request", _error_body(
                "The request is not valid HTTP/1.1 (a malformed request line, header or body framing).",
                "invalid_http")))

        def _arm_head_timer(self) -> None:
            self._head_timer = self.loop.call_later(header_timeout, self._head_timed_out)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing():
                return
            if self._in_head:
                self._refuse(too_slow)
            elif self.cycle is None:  # connected and never sent a byte
                self.transport.close()

        def _refuse(self, response: bytes) -> None:
            """Answer and end the connection. Closing a socket with unread input makes the
            kernel reset it, and a reset can discard the answer before the client reads it
            (a client still sending a huge header would see only "connection reset"). So,
            as nginx's lingering close: send the answer, shut down our side, drop what
            still arrives, and close when the client does or after a grace period."""
            self._disarm_head_timer()
            if self._refused:
                return
            self._refused = True
            self.transport.write(response)
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(_LINGER_SECONDS, self.transport.close)

    return GuardedHttpToolsProtocol
