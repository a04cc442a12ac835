"""uvicorn's HTTP/1.1 protocol (httptools) with limits on the request head.

uvicorn bounds neither the size of a request's head nor the time it may take to arrive:
httptools buffers a header until it is complete (a 100 MB header was accepted, and parsing
a 60 MB one stopped the event loop for 2 s), and a connection that sends a partial head, or
nothing, is held open for as long as the client likes (slowloris). A load balancer in front
(deploy/nginx) enforces both; these limits keep a server that is reached directly safe too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
import uuid
from typing import Any, Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.errors import InvalidRequestError


access_log = logging.getLogger("qwenvl.access")

try:  # the kernel's count of a socket's unsent and unacknowledged bytes (Linux, BSD, macOS)
    import fcntl
    import termios

    _TIOCOUTQ: int | None = termios.TIOCOUTQ
except (ImportError, AttributeError):
    _TIOCOUTQ = None

#: The ASGI scope extension (a callable) that sends the next response head with the body
#: written after it (`_LingeringTransport.hold_next_write`).
HOLD_HEAD = "qwenvl.hold_head"

#: How long a refused connection is kept reading (and dropping) input after its answer.
_LINGER_SECONDS = 2.0


def _error_body(message: str, code: str) -> bytes:
    return InvalidRequestError(message, code=code).to_json()


def _framed(status: int, reason: str, body: bytes) -> bytes:
    """A whole HTTP/1.1 response carrying `body` (JSON), after which the connection ends.

    It carries a fresh X-Request-Id, as every answer of the app does, and the refusal gets
    an access-log line under that id (the app never sees these requests, so its access log
    would not), so that a client's report of one can be found in the log."""
    rid = uuid.uuid4().hex
    access_log.info(json.dumps({"request_id": rid, "status": status, "error": json.loads(body)["error"]["code"]}))
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nx-request-id: {rid}\r\nconnection: close\r\n\r\n").encode() + body


class _LingeringTransport:
    """A connection's transport as the protocol and uvicorn's request cycles see it. Closed
    while the client is still sending its request (an answer given before the whole body
    arrived: the app's 408 for a body too slow, 413, 401), it ends the connection as a
    refusal does (`_answer`): the kernel resets a socket closed with unread input, and the
    reset could discard the answer before the client read it (seen: a client dripping its
    body got "connection reset" instead of the 408)."""

    def __init__(self, transport: Any, protocol: Any) -> None:
        self._transport = transport
        self._protocol = protocol
        self._eof = False
        self._hold = False
        self._held = b""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def hold_next_write(self) -> None:
        """Keep the next write (a response head) and send it with the one after (the body
        that follows at once): one send, and one wake-up of the client, where uvicorn
        makes two. Whatever is held goes out with any later write, and before an EOF or close."""
        self._hold = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._held:
            data, self._held = self._held + data, b""
        if self._hold:
            self._hold = False
            self._held = bytes(data)
            return
        self._transport.write(data)

    def _flush(self) -> None:
        self._hold = False
        if self._held and not self._transport.is_closing():
            self._transport.write(self._held)
        self._held = b""

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._held)

    def is_closing(self) -> bool:
        return self._eof or self._transport.is_closing()

    def write_eof(self) -> None:
        self._flush()
        self._eof = True
        self._transport.write_eof()

    def close(self) -> None:
        self._flush()
        protocol, transport = self._protocol, self._transport
        if (not self._eof and protocol._in_message and not transport.is_closing()
                and transport.can_write_eof()):
            protocol._refused = True  # what the client still sends is read and dropped
            self.write_eof()
            protocol.loop.call_later(_LINGER_SECONDS, transport.close)
        else:
            transport.close()


def guarded_protocol(max_header_bytes: int, header_timeout: float,
                     send_timeout: float | None = None,
                     on_refusal: Callable[[str], None] | None = None) -> type[HttpToolsProtocol]:
    """A protocol class for `uvicorn.Config(http=...)`. `on_refusal` is called with the
    error code of every refusal it answers itself (the app never sees those requests, so
    its error counter would not).

    - A request head (request line and headers) larger than `max_header_bytes` gets a 431
      and the connection is closed, with at most one read's worth (256 KiB) buffered past it.
    - A head must be complete within `header_timeout` seconds of its first byte, and a new
      connection must send one within that time; otherwise 408 (if anything arrived) and
      the connection is closed. Idle keep-alive connections keep uvicorn's own timeout.
    - Bytes that are not HTTP get a JSON 400 like every other refusal (uvicorn's is text).
    - A connection whose client takes none of what is waiting to be sent for `send_timeout`
      seconds (the send buffer above its high-water mark, and not shrinking) is dropped,
      with what it held. uvicorn writes a whole response body at once, and writes never wait for the
      client: a non-streamed answer of megabytes (n=8 with logprobs) sat in the buffer for
      as long as its client kept the connection open without reading, and was logged a 200.
      (The app's own send timeout catches a stream that stalls; this catches what it cannot
      see, and drops the connection, which a stream abandoned by the app kept too.)
    """
    too_large = (431, "Request Header Fields Too Large", _error_body(
        f"The request's headers exceed this server's limit of {max_header_bytes} bytes.", "headers_too_large"))
    uri_too_long = (414, "URI Too Long", _error_body(
        f"The request's target (path and query) exceeds this server's limit of {max_header_bytes} bytes.",
        "uri_too_long"))
    too_slow = (408, "Request Timeout", _error_body(
        f"The request's headers did not arrive within {header_timeout:g} seconds.", "header_timeout"))

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _in_head = False  # a request head is being received
        _in_message = False  # a request is being received (head or body)
        _head_bytes = 0  # bytes read while the head was incomplete, after the read it began in
        _head_size = 0  # the head's request target and headers, as parsed
        _url_size = 0  # its request target, as parsed
        _stalled_bytes = 0  # bytes read in a body that moved it no further (trailers, extensions)
        _began = False  # a message began during the current read
        _moved = False  # the current read carried body data or ended a message
        _ended = False  # a message ended during the current read
        _head_timer: asyncio.TimerHandle | None = None
        _send_timer: asyncio.TimerHandle | None = None
        _send_pending = 0  # bytes waiting to be sent when the send timer was last armed
        _refused = False

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.transport = _LingeringTransport(self.transport, self)
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_timer()
            self._disarm_send_timer()
            super().connection_lost(exc)

        def pause_writing(self) -> None:
            super().pause_writing()
            if send_timeout is not None and self._send_timer is None:
                self._send_pending = self._unsent()
                self._send_timer = self.loop.call_later(send_timeout, self._send_timed_out)

        def resume_writing(self) -> None:
            self._disarm_send_timer()
            super().resume_writing()

        def _unsent(self) -> int:
            """Bytes written and not yet taken by the client: those in the transport's buffer,
            and (on Linux) those in the kernel's send queue, which a slow reader drains long
            before the transport's buffer moves (the kernel takes more only once much of
            its queue is free)."""
            pending = self.transport.get_write_buffer_size()
            sock = self.transport.get_extra_info("socket")
            if sock is not None and _TIOCOUTQ is not None:
                with contextlib.suppress(OSError, ValueError):
                    pending += struct.unpack("i", fcntl.ioctl(sock.fileno(), _TIOCOUTQ, b"\0" * 4))[0]
            return pending

        def _disarm_send_timer(self) -> None:
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None

        def _send_timed_out(self) -> None:
            # While writing is paused nothing is added to the buffer: if it shrank, the client
            # is reading, however slowly.
            pending = self._unsent()
            if pending < self._send_pending:
                self._send_pending = pending
                self._send_timer = self.loop.call_later(send_timeout, self._send_timed_out)
                return
            self._send_timer = None
            logging.getLogger("qwenvl").info(
                "a client took nothing of %d bytes waiting for it for %g s; connection dropped",
                pending, send_timeout)
            self.transport.abort()

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return  # what a refused client still sends is read and dropped (see _refuse)
            self._began = self._moved = self._ended = False
            # (this cancels uvicorn's keep-alive timer: any bytes count as activity)
            super().data_received(data)
            if self._refused or self.transport.is_closing():
                return
            answered = self.cycle is not None and self.cycle.response_complete
            if self._in_head:
                if not (self._began and self._ended):  # (a read that also ended the message
                    self._head_bytes += len(data)      # before it is left out: pipelining)
                if self._head_bytes > max_header_bytes:
                    self._refuse(self._too_large())
            elif self._in_message and not answered:
                # A body the app is reading: its own timeout applies. Reads that move it no
                # further are trailers or chunk extensions, which the parser buffers whole.
                self._stalled_bytes = 0 if self._moved else self._stalled_bytes + len(data)
                if self._stalled_bytes > max_header_bytes:
                    self._refuse(too_large)
            elif (self._in_message or not (self._began or self._moved)) and self._head_timer is None:
                # The unread rest of a body after the answer, or stray bytes between requests
                # (these reads cancelled uvicorn's keep-alive timer): the connection ends
                # unless a request begins within the head timeout.
                self._arm_head_timer()

        def on_message_begin(self) -> None:
            if self._refused:
                return
            super().on_message_begin()
            self._in_head = self._in_message = self._began = True
            self._head_bytes = self._head_size = self._stalled_bytes = self._url_size = 0
            self._disarm_head_timer()  # (an idle timer, or the one since the connection opened)
            self._arm_head_timer()

        def on_url(self, url: bytes) -> None:
            if self._refused:
                return
            self._head_size += len(url)
            self._url_size += len(url)
            super().on_url(url)

        def _too_large(self) -> tuple[int, str, bytes]:
            """The refusal of a head over the limit: 414 where the request target alone is
            over it, or all that arrived of the head is still its request line (the method,
            target and version: at most 20 bytes besides the target); else 431 (RFC 9110
            15.5.15; RFC 6585 5)."""
            if self._url_size > max_header_bytes or (self._in_head and self._url_size + 20 >= self._head_bytes):
                return uri_too_long
            return too_large

        def on_header(self, name: bytes, value: bytes) -> None:
            if self._refused:
                return
            self._head_size += len(name) + len(value) + 4  # ": " and CRLF (trailers count too)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            if self._refused:
                return
            self._in_head = False
            self._disarm_head_timer()
            if self._head_size <= max_header_bytes:
                super().on_headers_complete()
                if self.cycle is not None:
                    self.cycle.scope.setdefault("extensions", {})[HOLD_HEAD] = self.transport.hold_next_write
                    if self.cycle.scope.get("http_version") == "1.0":
                        _unframed_for_http10(self.cycle)
                return
            # A head that arrived whole in one read, measured as parsed. (The parser goes on
            # with the rest of this read; every callback below ignores it once refused.)
            self._refuse(self._too_large())

        def on_body(self, body: bytes) -> None:
            if self._refused:
                return
            self._moved = True
            super().on_body(body)

        def on_message_complete(self) -> None:
            if self._refused:
                return
            self._in_message = False
            self._moved = self._ended = True
            if self._head_timer is not None and self.cycle is not None and self.cycle.response_complete:
                # The rest of an answered request's body has arrived: the connection is idle
                # now, for as long as uvicorn's keep-alive allows (its own timer was cancelled).
                self._disarm_head_timer()
                self._arm_head_timer(self.timeout_keep_alive)
            super().on_message_complete()

        def send_400_response(self, msg: str) -> None:
            # uvicorn's answer to bytes its parser refuses (a bad request line, header or
            # framing): the same words, as the JSON error every other refusal is.
            self._refuse((400, "Bad Request", _error_body(
                "The request is not valid HTTP/1.1 (a malformed request line, header or body framing).",
                "invalid_http")))

        def _arm_head_timer(self, delay: float = header_timeout) -> None:
            self._head_timer = self.loop.call_later(delay, self._head_timed_out)

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
            else:  # connected and never sent a request, or idle after stray bytes
                self.transport.close()

        def _refuse(self, response: tuple[int, str, bytes]) -> None:
            """Answer and end the connection; what the client still sends is dropped.

            Where a response is under way, the refusal cannot go in the middle of it:
            - the request whose body broke its framing (or overran a limit) has no answer
              yet: its app is told the client left (it can answer no one now) and the
              refusal goes out at once;
            - a complete request (the bytes after it broke, a pipelined head too slow or
              too large) is answered first, then the refusal; the connection reads no
              further meanwhile;
            - otherwise (an earlier response already on the wire, requests queued behind
              it) the connection just closes."""
            self._disarm_head_timer()
            if self._refused:
                return
            self._refused = True
            cycle = self.cycle
            if cycle is None or cycle.response_complete:
                self._answer(response)
            elif self.pipeline or cycle.response_started and self._reading_body_of_current:
                self.transport.close()
            elif self._reading_body_of_current:
                cycle.disconnected = True
                cycle.message_event.set()
                self._answer(response)
            else:
                self.flow.pause_reading()

                def answer_after() -> None:  # (in place of the protocol's own callback)
                    self.server_state.total_requests += 1
                    if not self.transport.is_closing():
                        self.flow.resume_reading()  # (what still arrives is read and dropped)
                        self._answer(response)

                cycle.on_response = answer_after

        @property
        def _reading_body_of_current(self) -> bool:
            """The message being read is the current cycle's own (its head parsed)."""
            return self._in_message and not self._in_head

        def _answer(self, response: tuple[int, str, bytes]) -> None:
            """Send `response` and close as nginx's lingering close does. Closing a socket
            with unread input makes the kernel reset it, and a reset can discard the answer
            before the client reads it (a client still sending a huge header would see only
            "connection reset"): so shut down our side, drop what still arrives, and close
            when the client does or after a grace period."""
            self.transport.write(_framed(*response))
            if on_refusal is not None:
                on_refusal(json.loads(response[2])["error"]["code"])
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(_LINGER_SECONDS, self.transport.close)

    return GuardedHttpToolsProtocol


#: The length uvicorn is told a body without one has (it counts down what is sent).
_UNBOUNDED = 1 << 62


def _unframed_for_http10(cycle: Any) -> None:
    """An HTTP/1.0 client's response without a Content-Length (a stream) is sent as it is and
    ended by closing the connection: uvicorn would frame it in chunks, which HTTP/1.0 does
    not have (RFC 9112 6.1), and the client would read the chunk sizes as body text.

    uvicorn frames a body in chunks only where `chunked_encoding` is still undecided when
    the headers go out; decided against, it writes the body as given, counting it down from
    `expected_content_length`, which the last part settles."""
    send = cycle.send
    unframed = False

    async def send_unframed(message: Any) -> None:
        nonlocal unframed
        if message["type"] == "http.response.start" and not cycle.response_started:
            names = {name.lower() for name, _ in message.get("headers", ())}
            if (b"content-length" not in names and b"transfer-encoding" not in names
                    and cycle.scope["method"] != "HEAD" and message["status"] not in (204, 304)):
                unframed = True
                cycle.chunked_encoding = False
                cycle.expected_content_length = _UNBOUNDED
        elif unframed and message["type"] == "http.response.body" and not message.get("more_body", False):
            cycle.expected_content_length = len(message.get("body", b""))
        await send(message)

    cycle.send = send_unframed

