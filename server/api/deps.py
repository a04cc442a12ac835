"""FastAPI dependencies: typed access to the per-app runtime."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.runtime import Runtime


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
