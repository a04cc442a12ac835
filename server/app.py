"""The app factory. Nothing heavy happens at import; `create_app` wires settings, metrics,
the engine (given, or loaded in the background), routes, middleware and error mapping."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from server.api import chat, health, models
from server.api.body import validation_to_api_error
from server.engine.base import Engine
from server.errors import APIError, InvalidRequestError
from server.metrics import Metrics
from server.middleware import BODY_CUT_OFF, BODY_STALLED, install_middleware
from server.runtime import ClientGone, Runtime
from server.settings import Settings


def default_images_factory(settings: Settings, metrics: Metrics) -> Callable[[Engine], Any]:
    def build(engine: Engine):
        from server.images import ImageLoader

        max_pixels = engine.info.image_processor.get("max_pixels")
        square = engine.info.image_processor.get("image_size")
        return ImageLoader(settings, metrics, family=engine.info.family,
                           model_max_pixels=max_pixels if isinstance(max_pixels, int) else None,
                           model_square_side=square if isinstance(square, int) else None)

    return build


def create_app(
    settings: Settings,
    *,
    engine: Engine | None = None,
    engine_factory: Callable[[], Engine] | None = None,
    images_factory: Callable[[Engine], Any] | None = None,
    model_names: list[str] | None = None,
    on_fatal: Callable[[int], None] | None = None,
    metrics: Metrics | None = None,
) -> FastAPI:
    """Build the ASGI app.

    Give `engine` (already started, e.g. a scripted engine in tests) or `engine_factory`
    (a blocking callable, run in a thread after start-up so /health and /ready answer
    while the model loads). `on_fatal(code)` is called when the engine dies or fails to
    load, so the process can exit and be restarted.
    """
    if engine is None and engine_factory is None:
        raise ValueError("create_app needs an engine or an engine_factory")
    names = model_names or [settings.served_model_name or settings.model or "qwen-vl"]
    metrics = metrics or Metrics(model_names=names)
    runtime = Runtime(
        settings,
        metrics,
        names,
        engine_factory,
        engine,
        images_factory or default_images_factory(settings, metrics),
        on_fatal,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await runtime.startup()
        try:
            yield
        finally:
            await runtime.shutdown()

    docs = settings.docs
    # redirect_slashes off: "/v1/chat/completions/" is a JSON 404, not a 307 to an address
    # built from the client's own Host header.
    app = FastAPI(title="qwen-vl-serve", lifespan=lifespan, root_path=settings.root_path, redirect_slashes=False,
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    app.state.runtime = runtime
    _add_request_schemas(app)
    app.include_router(chat.router)
    app.include_router(models.router)
    app.include_router(health.router)
    _install_error_handlers(app, metrics)
    install_middleware(app, settings, runtime)
    return app


def _add_request_schemas(app: FastAPI) -> None:
    """List the chat request's schemas under the API docs' components, where the endpoint's
    body refers to them (and where client generators look for them)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(chat.request_schemas())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Our exception types and FastAPI's validation errors become OpenAI-style error JSON;
    anything unexpected becomes a 500 in GatewayMiddleware. Library exception texts never
    reach the client."""

    def respond(err: APIError) -> JSONResponse:
        metrics.errors.labels(err.code or err.type).inc()
        return JSONResponse(err.to_dict(), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return respond(exc)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        # Nobody is listening; 499 (nginx's "client closed request") marks it in the log.
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return respond(validation_to_api_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # (FastAPI's own 400 for a body it could not parse: our chat endpoint parses its
        # body itself, with messages that say what was wrong.)
        kinds = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed", 408: "body_timeout",
                 503: "service_unavailable"}
        err = APIError(
            {400: "The request body could not be parsed as JSON.",
             404: "No such endpoint.", 405: "Method not allowed on this endpoint.",
             408: BODY_STALLED, 503: BODY_CUT_OFF}.get(
                exc.status_code, "The request could not be served."
            ),
            status=exc.status_code,
            code=kinds.get(exc.status_code, "http_error"),
            headers=dict(exc.headers or {}),
        )
        if exc.status_code == 405:
            err.headers["Allow"] = _allowed_methods(app, request.scope) or err.headers.get("Allow", "")
        err.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return respond(err)


def _allowed_methods(app: FastAPI, scope: Any) -> str:
    """Every method some route serves at this path. (Starlette's 405 names the methods of
    the first route for the path only: `GET` and `HEAD` of /health are two routes.)"""
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches(scope)
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))
