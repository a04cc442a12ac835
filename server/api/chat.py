"""POST /v1/chat/completions."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from server.api.body import check_media_type, parse_json_body, validate_body
from server.api.deps import RuntimeDep
from server.api.event_stream import EventStreamResponse
from server.chat.service import ChatService
from server.engine import EngineDeadError
from server.errors import InvalidRequestError, RequestTimeoutError, ServiceUnavailableError
from server.runtime import ENGINE_STOPPED, RETRY_SOON, ClientGone, before_drain
from server.schemas import ChatCompletionRequest

router = APIRouter()

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def request_schemas() -> dict[str, Any]:
    """The request body's JSON schemas for the API docs' components, by name: the body is
    parsed by hand (server.api.body), so FastAPI does not list them itself."""
    schema = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    return {"ChatCompletionRequest": schema, **schema.pop("$defs", {})}


@router.post(
    "/v1/chat/completions",
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}}},
)
async def chat_completions(request: Request, rt: RuntimeDep):
    arrived = time.perf_counter()
    # (before the body is read: loading, draining or dead, a client sending a large body
    # learns it at once, not once it has sent it all)
    service = rt.chat_service(before_drain=before_drain(request))
    body = await _read_body(request, service)
    deadline = rt.settings.request_timeout  # counted from arrival, time in the queue included
    release = await rt.admit(request, max(deadline - (time.perf_counter() - arrived), 0.001))
    try:
        prepared = await rt.prepare_while_connected(
            request, service.prepare(body, request.state.request_id, started=arrived),
            timeout=deadline - (time.perf_counter() - arrived),
        )
        request.state.log.update(images=len(prepared.image_sizes), **prepared.stats)
        prepared.stats = request.state.log  # tokens, and how a stream ended, land in the log
        stream = body.stream
        del body  # its data URLs are in the engine's hands now, and need not live as long as the answer
        request.state.body_ticket.release()
        if stream:
            events = rt.stream_with_deadline(service.stream(prepared), prepared, release)
            release = None  # the stream owns the slot now
            # for GatewayMiddleware when the client stops reading: ends the stream, frees the slot
            request.state.abandon = events.aclose
            return EventStreamResponse(events, headers=STREAM_HEADERS)
        result = await rt.until_disconnect(request, service.complete(prepared), prepared)
        return Response(result, media_type="application/json")
    except EngineDeadError as exc:  # died after the readiness check above, before the watcher saw it
        raise ServiceUnavailableError(ENGINE_STOPPED, headers=RETRY_SOON) from exc
    except asyncio.TimeoutError as exc:
        raise RequestTimeoutError(
            f"The request took longer than the server's {rt.settings.request_timeout:g} s deadline."
        ) from exc
    finally:
        if release is not None:
            release()


async def _read_body(request: Request, service: ChatService) -> ChatCompletionRequest:
    """The request's body, read (drawing on the server's body budget as it arrives), parsed
    and validated. Read from the stream rather than `request.body()`, which would keep the
    raw bytes on the request for as long as the response lasts."""
    if len(request.headers.getlist("content-type")) > 1:
        # (a proxy in front that reads the last one would disagree with us on what the body is)
        raise InvalidRequestError("The request has more than one Content-Type header; send one.",
                                  code="invalid_http")
    check_media_type(request.headers.get("content-type"), request.headers.get("content-encoding"),
                     request.headers.get("transfer-encoding"))
    try:
        raw = b"".join([chunk async for chunk in request.stream()])
    except ClientDisconnect:  # gone before the whole body arrived: nobody to answer
        raise ClientGone() from None
    data = parse_json_body(raw)
    del raw
    if isinstance(data, dict) and isinstance(data.get("messages"), list):
        messages = data["messages"]  # counted before validating them all
        service.check_message_count(len(messages), _content_parts(messages))
    return validate_body(ChatCompletionRequest, data)


def _content_parts(messages: list[Any]) -> int:
    """How many content parts the (not yet validated) messages hold in their content lists,
    with their tool calls (each rendered into the prompt as a part of text)."""
    return sum((len(m["content"]) if isinstance(m.get("content"), list) else 0)
               + (len(m["tool_calls"]) if isinstance(m.get("tool_calls"), list) else 0)
               + (m.get("function_call") is not None)
               for m in messages if isinstance(m, dict))
