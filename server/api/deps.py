"""FastAPI dependencies: typed access to the per-app runtime."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.runtime import Runtime


async def get_runtime(request: Request) -> Runtime:
    # async on purpose: FastAPI runs a plain `def` dependency in a worker thread, a thread
    # hop on every request (/health included) that showed up in profiles under load.
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
