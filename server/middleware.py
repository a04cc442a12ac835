"""Pure-ASGI middleware (no per-request task or body copies): request ids, API keys, the
request body cap, CORS, and one JSON access-log line per request."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Callable

from fastapi import FastAPI
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.admission import BodyBudgetError, BodyCutoff, BodyTicket
from server.errors import (
    APIError,
    AuthenticationError,
    BodyTimeoutError,
    InternalError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    ServiceUnavailableError,
)
from server.http_protocol import HOLD_HEAD
from server.runtime import RETRY_SOON
from server.settings import Settings

access_log = logging.getLogger("qwenvl.access")
log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_OPEN_PATHS = ("/health", "/ready")
#: Paths whose successful requests get no access-log line.
_QUIET_PATHS = ("/health", "/ready", "/metrics")
_LOGGED_PATH_CHARS = 256


class _State(dict):
    """Per-request fields for the access log (status, tokens, images, ...)."""


def _body_follows(scope: Scope, response_headers: MutableHeaders) -> bool:
    """Whether a response's body is written right after its head, so that the head can wait
    for it (`HOLD_HEAD`): a body of known, non-zero length (Starlette's responses send it at
    once), or an event stream (`EventStreamResponse` sends its head with the first event)."""
    if scope.get("method") == "HEAD":
        return False  # (no body is written)
    if response_headers.get("content-type", "").startswith("text/event-stream"):
        return True
    length = response_headers.get("content-length")
    return length is not None and length.isdigit() and int(length) > 0


async def _send_error(send: Send, err: APIError, extra_headers: dict[str, str]) -> None:
    body = err.to_json()
    headers = {"content-type": "application/json", "content-length": str(len(body)), **err.headers, **extra_headers}
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]})
    await send({"type": "http.response.body", "body": body})


def request_id(headers: Headers) -> str:
    """The client's X-Request-Id when it is a plain token of at most 128 characters (it goes
    into logs and response headers), else a new random one."""
    rid = headers.get("x-request-id", "")
    return rid if _REQUEST_ID.match(rid) else uuid.uuid4().hex


class GatewayMiddleware:
    """Request id, authentication, body cap and access log in one pass."""

    def __init__(self, app: ASGIApp, settings: Settings, runtime) -> None:
        self.app = app
        self.settings = settings
        self.runtime = runtime
        self.keys = [k.encode() for k in settings.all_api_keys()]

    async def _refuse(self, send: Send, err: APIError, extra_headers: dict[str, str]) -> None:
        """Answer with `err` from here, counted as the app's own errors are."""
        self.runtime.metrics.errors.labels(err.code or err.type).inc()
        await _send_error(send, err, extra_headers)

    def _needs_key(self, path: str) -> bool:
        if not self.keys:
            return False
        if path in _OPEN_PATHS:
            return self.settings.auth_health_endpoints
        if path == "/metrics":
            return self.settings.auth_metrics
        return True

    def _authorized(self, headers: Headers) -> bool:
        values = headers.getlist("authorization")
        if len(values) != 1:  # (two keys: which one a proxy before us checked is anyone's guess)
            return False
        value = values[0]
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        presented = token.strip().encode()
        ok = False
        for key in self.keys:  # constant time per key, and every key is compared
            ok |= hmac.compare_digest(presented, key)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        closed = self.runtime.request_opened()  # (a drain waits for the request: see Runtime.drain)
        try:
            await self._serve(scope, receive, send, before_drain=closed is not None)
        finally:
            if closed is not None:
                closed()

    async def _serve(self, scope: Scope, receive: Receive, send: Send, *, before_drain: bool) -> None:
        headers = Headers(scope=scope)
        rid = request_id(headers)
        started = time.perf_counter()
        log_fields = _State()
        scope.setdefault("state", {})
        scope["state"]["request_id"] = rid
        scope["state"]["log"] = log_fields
        scope["state"]["before_drain"] = before_drain
        status_holder = {"status": 0}
        path = _route_path(scope)

        send_timeout = self.settings.send_timeout
        # A client that sent `Expect: 100-continue` holds its body back until the server asks
        # for it (its first read). Answered without a read, it may send the body or leave it
        # unsent and reuse the connection, where its next request would be read as the body:
        # that connection must end with the answer.
        body_unasked = headers.get("expect", "").lower() == "100-continue"
        if body_unasked:
            receive = _on_first_call(receive, lambda: status_holder.update(body_asked=True))

        hold_head = scope.get("extensions", {}).get(HOLD_HEAD)
        watch = _SendWatch(send_timeout)

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                response_headers = MutableHeaders(scope=message)
                response_headers["x-request-id"] = rid
                if body_unasked and not status_holder.get("body_asked"):
                    response_headers["connection"] = "close"
                elif self.runtime.draining:
                    # (a client, or a proxy's kept-alive upstream connection, goes on to a
                    # replica that stays, rather than sending here until the process exits)
                    response_headers["connection"] = "close"
                if hold_head is not None and _body_follows(scope, response_headers):
                    hold_head()
                await send(message)
                return
            # A client that stops reading would otherwise hold the response (and its
            # processing slot) for as long as it keeps the connection open.
            await watch.send(send, message)
            if not message.get("more_body", False):
                status_holder["complete"] = True  # (only once it went out: a stalled client did not get it)

        receive = _body_deadline(receive, self.settings.body_read_timeout, self.settings.body_timeout,
                                 self.runtime.body_cutoff)
        ticket = self.runtime.body_budget.ticket()
        scope["state"]["body_ticket"] = ticket  # (the chat handler releases it once parsed)
        receive = _body_counted(receive, ticket)
        try:
            if scope.get("http_version") == "1.1" and len(headers.getlist("host")) != 1:
                # RFC 9112 3.2: exactly one Host in an HTTP/1.1 request, else a 400 (a cache or
                # proxy in front may have read another one, or none, than the one we were sent)
                await self._refuse(send_wrapper, InvalidRequestError(
                    "An HTTP/1.1 request must carry exactly one Host header.", code="invalid_http"),
                    {"connection": "close"})
                return
            if _encoded_slash_outside_model_id(scope.get("raw_path", b"")):
                # A path routed after decoding: /v1/chat%2Fcompletions reached the chat
                # endpoint, past a proxy in front that filters on the path as sent.
                await self._refuse(send_wrapper, NotFoundError(
                    "Not found: an encoded slash (%2F) in a path is not accepted."), {})
                return
            if self._needs_key(path) and not self._authorized(headers):
                await self._refuse(send_wrapper, AuthenticationError(
                    "Missing or invalid API key: send 'Authorization: Bearer <key>'."),
                    {"www-authenticate": "Bearer"})
                return
            limit = self.settings.max_request_bytes
            declared = _declared_length(headers.get("content-length"))
            if declared is not None and declared > limit:
                await self._refuse(send_wrapper, _too_large(limit), {"connection": "close"})
                return
            try:
                if declared is None and scope.get("method") in ("POST", "PUT", "PATCH"):
                    # A chunked body, or a length spelled so that it is not read here, has no
                    # size to trust: read it under the cap (the JSON parser would read it whole
                    # anyway), then replay it to the app.
                    replay = await _read_capped(receive, limit)
                    if replay is None:
                        await self._refuse(send_wrapper, _too_large(limit), {"connection": "close"})
                        return
                    receive = replay
                await self.app(scope, receive, send_wrapper)
            except _SendStalled:
                log.info("request %s: the client took nothing for %g s; response abandoned", rid, send_timeout)
                abandon = scope["state"].get("abandon")
                if abandon is not None:
                    with contextlib.suppress(Exception):
                        await abandon()
            except _BodyStalled:
                if status_holder["status"]:
                    raise
                await self._refuse(send_wrapper, BodyTimeoutError(BODY_STALLED), {"connection": "close"})
            except _BodyCutOff:
                if status_holder["status"]:
                    raise
                await self._refuse(send_wrapper, ServiceUnavailableError(BODY_CUT_OFF, headers=RETRY_SOON),
                                   {"connection": "close"})
            except BodyBudgetError as err:  # (raised here while a chunked body is read under the cap)
                if status_holder["status"]:
                    raise
                await self._refuse(send_wrapper, err, {})
            except Exception:
                # Caught here, inside the access log and the outcome counters, rather than
                # by Starlette's outermost handler: the 500 is logged and counted as one
                # (not as a client that went away) and the connection stays usable.
                if status_holder["status"]:
                    raise  # the response has begun; there is no error to send any more
                log.exception("unhandled error")
                await self._refuse(send_wrapper, InternalError("The server failed to process the request."), {})
        finally:
            watch.close()
            ticket.release()
            status = status_holder["status"] or 499
            entry = {
                "request_id": rid,
                "method": scope.get("method"),
                "path": path[:_LOGGED_PATH_CHARS],  # (a path can be as long as the head allows)
                "status": status,
                "latency_ms": round((time.perf_counter() - started) * 1000, 1),
            }
            if path == "/v1/chat/completions":
                entry.update(log_fields)
                if status_holder["status"] and not status_holder.get("complete"):
                    # Begun but never finished: a stream the client left (or stopped reading).
                    entry.setdefault("error", "client_disconnected")
                    entry.setdefault("error_status", 499)
                access_log.info(json.dumps(entry))
                if status_holder["status"] == 200 and log_fields.get("error"):
                    # a stream that ended with an error event (its HTTP status was 200)
                    self.runtime.metrics.errors.labels(log_fields["error"]).inc()
                # (a stream that ended with an error event counts as that error, not a success)
                _count_outcome(self.runtime, entry.get("error_status") or status)
            elif status >= 400 or path not in _QUIET_PATHS:
                # (probes and scrapes that succeed would drown the log; a refused one, such
                # as a 401, gets its line)
                access_log.info(json.dumps(entry))


def _route_path(scope: Scope) -> str:
    """The path the app routes on: without the `--root-path` prefix, which a proxy that does
    not strip it leaves in the request's path (the auth rules, the access log and the
    counters name paths without it)."""
    path: str = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] in ("/", ""):
        return path[len(root):] or "/"
    return path


class _SendStalled(Exception):
    """The client took no part of the response for the send timeout."""


class _SendWatch:
    """Bounds each send of one response's body to `timeout` seconds (`_SendStalled` past it).

    What `asyncio.timeout` around each send does, without its timer per send (4-5 us a
    write, and a stream writes once per engine output, on a loop that is the limit at 64
    streams): a send notes when it began, and one timer, re-armed only when it fires, cancels
    the sending task once a send has gone on for `timeout`. Sends almost never wait: they
    are written to the socket's buffer at once."""

    __slots__ = ("_timeout", "_loop", "_since", "_task", "_cancelling", "_handle", "_fired")

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._since: float | None = None  # when the send now going on began
        self._task: asyncio.Task | None = None
        self._cancelling = 0
        self._handle: asyncio.TimerHandle | None = None
        self._fired = False

    async def send(self, send: Send, message: Message) -> None:
        task = asyncio.current_task()
        self._task, self._cancelling = task, task.cancelling()
        self._since = self._loop.time()
        if self._handle is None:
            self._handle = self._loop.call_at(self._since + self._timeout, self._check)
        try:
            await send(message)
        except asyncio.CancelledError:
            if self._fired:  # (ours, unless someone else cancelled the task too)
                self._fired = False
                if task.uncancel() <= self._cancelling:
                    raise _SendStalled() from None
            raise
        finally:
            self._since = None

    def _check(self) -> None:
        self._handle = None
        if self._since is None:
            return  # (no send going on: the next one arms the timer again)
        due = self._since + self._timeout
        if self._loop.time() >= due:
            self._fired = True
            self._task.cancel()
        else:
            self._handle = self._loop.call_at(due, self._check)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


BODY_STALLED = "The request body did not arrive in time: it stopped, or came too slowly, before it was complete."


class _BodyStalled(StarletteHTTPException):
    """The client sent part of a request body and then nothing for the body timeout. An
    HTTP exception, so that FastAPI's body parser passes it on (it turns anything else into
    a 400); the app's handler then answers 408."""

    def __init__(self) -> None:
        super().__init__(status_code=408, headers={"connection": "close"})


BODY_CUT_OFF = ("The server is shutting down and its drain ended before the request body had arrived; "
                "retry on another replica.")


class _BodyCutOff(StarletteHTTPException):
    """A drain ran out of time while the request body was still arriving (an HTTP exception
    for the reason `_BodyStalled` is one; the app's handler answers 503)."""

    def __init__(self) -> None:
        super().__init__(status_code=503, headers={"connection": "close", **RETRY_SOON})


def _body_deadline(receive: Receive, timeout: float, total: float, cutoff: BodyCutoff) -> Receive:
    """`receive` that raises `_BodyStalled` when the next part of the request body takes
    longer than `timeout`, or the whole body longer than `total` seconds from the first call
    (a client dripping a byte now and then would otherwise hold its connection for ever),
    and `_BodyCutOff` once a drain has cut off the bodies still arriving.
    Once the body is complete it waits as long as it takes (a streaming response waits on it
    for the client's disconnect)."""
    done = False
    deadline: float | None = None

    async def timed() -> Message:
        nonlocal done, deadline
        if done:
            return await receive()
        now = time.monotonic()
        deadline = deadline or now + total
        try:
            if cutoff.done:
                raise TimeoutError
            async with cutoff.timeout(max(0.0, min(timeout, deadline - now))):
                message = await receive()
        except TimeoutError:
            raise (_BodyCutOff() if cutoff.done else _BodyStalled()) from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            done = True
        return message

    return timed


def _on_first_call(receive: Receive, first: Callable[[], None]) -> Receive:
    """`receive` that calls `first()` before its first call goes through."""
    called = False

    async def marked() -> Message:
        nonlocal called
        if not called:
            called = True
            first()
        return await receive()

    return marked


def _body_counted(receive: Receive, ticket: BodyTicket) -> Receive:
    """`receive` that draws each part of the request body from the server's body budget as
    it arrives (raising `BodyBudgetError` when it does not fit)."""

    async def counted() -> Message:
        message = await receive()
        if message["type"] == "http.request" and message.get("body"):
            ticket.take(len(message["body"]))
        return message

    return counted


def _count_outcome(runtime, status: int) -> None:
    outcome = (
        "success" if status < 400 else "rate_limited" if status == 429 else
        "unavailable" if status == 503 else "cancelled" if status == 499 else
        "client_error" if status < 500 else "server_error"
    )
    runtime.metrics.requests.labels(outcome).inc()


def _too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"The request body exceeds the server's limit of {limit} bytes; send smaller or fewer "
        "images, or image URLs instead of data URLs."
    )


def _declared_length(value: str | None) -> int | None:
    """A Content-Length header's value as a number, or None when there is none or it is not
    plain digits. The HTTP parser accepts spaces around the digits and any number of leading
    zeros, and passes them on: "64000000000 " must still count as 64 GB, and 5,000 zeros
    must not reach int()'s limit on digits."""
    if value is None:
        return None
    value = value.strip(" \t")
    if not (value.isascii() and value.isdigit()):
        return None
    digits = value.lstrip("0") or "0"
    return int(digits) if len(digits) <= 19 else 2**64


async def _read_capped(receive: Receive, limit: int) -> Receive | None:
    """The whole body as a replaying `receive`, or None once it exceeds `limit` bytes. A client
    that leaves before the body is complete is replayed as the disconnect, not as a body cut
    short (whose first part may parse, and would then be served to nobody)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            pending = [message]  # (the disconnect)
            break
        body = message.get("body", b"")
        size += len(body)
        if size > limit:
            return None
        chunks.append(body)
        if not message.get("more_body", False):
            pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
            break

    async def replay() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replay


class _JSONCORSMiddleware(CORSMiddleware):
    """Starlette's CORS middleware, with a refused preflight answered as our error JSON
    (Starlette's own is plain text) and with its other headers kept. Outside the gateway
    (preflights carry no credentials), so it gives its answers their X-Request-Id itself."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        response.headers["x-request-id"] = request_id(request_headers)
        if response.status_code < 400:
            return response
        refused = response.body.decode("ascii", "replace").removeprefix("Disallowed CORS ")
        err = InvalidRequestError(f"CORS preflight refused: this {refused} is not allowed.", code="cors_refused")
        headers = {k: v for k, v in response.headers.items() if k not in ("content-type", "content-length")}
        return JSONResponse(err.to_dict(), status_code=err.status, headers=headers)


def install_middleware(app: FastAPI, settings: Settings, runtime) -> None:
    app.add_middleware(GatewayMiddleware, settings=settings, runtime=runtime)
    # Added last, so outermost: CORS preflights carry no credentials and must pass auth.
    if settings.cors_allow_origins:
        app.add_middleware(
            _JSONCORSMiddleware,
            allow_origins=settings.cors_allow_origins,
            allow_methods=["GET", "HEAD", "POST", "OPTIONS"],
            # Any request header: the OpenAI SDKs add their own (x-stainless-*, openai-*),
            # and browsers preflight each; a fixed list would refuse them as SDKs change.
            allow_headers=["*"],
            expose_headers=["X-Request-Id", "Retry-After"],
        )


def _encoded_slash_outside_model_id(raw_path: bytes) -> bool:
    """Whether the path as sent holds an encoded slash anywhere but in the model id of
    /v1/models/{id} (where the SDK percent-encodes the slash of `Qwen/Qwen2-VL-7B-Instruct`;
    the route takes slashes, and routes nothing else)."""
    at = raw_path.lower().find(b"%2f")
    return at >= 0 and b"/v1/models/" not in raw_path[:at]

