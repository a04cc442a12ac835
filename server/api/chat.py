"""POST /v1/chat/completions."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.api.body import check_media_type, parse_json_body, validate_body
from server.api.deps import RuntimeDep
from server.errors import RequestTimeoutError
from server.schemas import ChatCompletionRequest

router = APIRouter()

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# The body is parsed by hand (server.api.body), so its schema is given to the API docs here;
# the schema's own definitions sit under it, referred to by JSON pointer.
_BODY_SCHEMA_AT = "#/paths/~1v1~1chat~1completions/post/requestBody/content/application~1json/schema"
_BODY_SCHEMA = ChatCompletionRequest.model_json_schema(ref_template=_BODY_SCHEMA_AT + "/$defs/{model}")


@router.post(
    "/v1/chat/completions",
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": _BODY_SCHEMA}}}},
)
async def chat_completions(request: Request, rt: RuntimeDep):
    arrived = time.perf_counter()
    check_media_type(request.headers.get("content-type"), request.headers.get("content-encoding"))
    data = parse_json_body(await request.body())
    if isinstance(data, dict) and isinstance(data.get("messages"), list):
        rt.chat_service().check_message_count(len(data["messages"]))  # before validating them all
    body = validate_body(ChatCompletionRequest, data)
    service = rt.chat_service()
    deadline = rt.settings.request_timeout  # counted from arrival, time in the queue included
    release = await rt.admit(request, deadline)
    try:
        prepared = await asyncio.wait_for(
            service.prepare(body, request.state.request_id, started=arrived),
            timeout=max(deadline - (time.perf_counter() - arrived), 0.001),
        )
        request.state.log.update(images=len(prepared.image_sizes))
        if body.stream:
            events = rt.stream_with_deadline(service.stream(prepared), prepared, release)
            release = None  # the stream owns the slot now
            # for GatewayMiddleware when the client stops reading: ends the stream, frees the slot
            request.state.abandon = events.aclose
            return StreamingResponse(
                events,
                media_type="text/event-stream",
                headers=STREAM_HEADERS,
            )
        result = await rt.until_disconnect(request, service.complete(prepared), prepared)
        request.state.log.update(prepared.stats)
        return JSONResponse(result.model_dump(exclude_none=False))
    except asyncio.TimeoutError as exc:
        raise RequestTimeoutError(
            f"The request took longer than the server's {rt.settings.request_timeout:g} s deadline."
        ) from exc
    finally:
        if release is not None:
            release()
