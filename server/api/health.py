"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api.deps import RuntimeDep
from server.runtime import RETRY_SOON

router = APIRouter()


@router.get("/health")
@router.head("/health", include_in_schema=False)  # for load balancers that probe with HEAD
async def health(rt: RuntimeDep) -> Response:
    """Liveness: the process is up and the engine (once loaded) is alive."""
    if rt.engine_dead:
        return JSONResponse({"status": "dead"}, status_code=503)
    return JSONResponse({"status": "ok" if rt.engine is not None else "loading"})


@router.get("/ready")
@router.head("/ready", include_in_schema=False)
async def ready(rt: RuntimeDep) -> Response:
    """Readiness: loaded, not draining, not dead."""
    state = rt.state()
    if state == "ready":
        return JSONResponse({"status": state})
    # (loading ends in a while; a draining or dead replica's probe may go on failing)
    return JSONResponse({"status": state}, status_code=503, headers=RETRY_SOON if state == "loading" else None)


@router.get("/metrics")
@router.head("/metrics", include_in_schema=False)
async def metrics(rt: RuntimeDep) -> Response:
    rt.refresh_engine_gauges()
    return Response(generate_latest(rt.metrics.registry), media_type=CONTENT_TYPE_LATEST)
