"""GET /v1/models."""

from __future__ import annotations

from fastapi import APIRouter

from server.api.deps import RuntimeDep
from server.errors import ModelNotFoundError, shown
from server.schemas import ModelCard, ModelList

router = APIRouter()


@router.get("/v1/models")
@router.head("/v1/models", include_in_schema=False)  # (GET's headers, no body: RFC 9110 9.3.2)
async def list_models(rt: RuntimeDep) -> ModelList:
    return ModelList(data=[_card(rt, name) for name in rt.model_names])


@router.get("/v1/models/{model_id:path}")
@router.head("/v1/models/{model_id:path}", include_in_schema=False)
async def get_model(model_id: str, rt: RuntimeDep) -> ModelCard:
    if model_id not in rt.model_names:
        raise ModelNotFoundError(f"The model '{shown(model_id)}' does not exist on this server.", param="model")
    return _card(rt, model_id)


def _card(rt, name: str) -> ModelCard:
    """`max_model_len`: the loaded engine's; while it loads, the one asked for on the command
    line (the engine refuses to start with any other), else null (the model config decides)."""
    engine = rt.engine
    limit = engine.info.max_model_len if engine else rt.settings.max_model_len
    return ModelCard(id=name, created=rt.started_at, max_model_len=limit)
