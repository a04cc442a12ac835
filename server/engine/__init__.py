"""The engine behind a small interface. Only `vllm_engine` imports vLLM."""

from server.engine.base import (
    ChoiceDelta,
    Engine,
    EngineDeadError,
    EngineStats,
    GenerationChunk,
    GenerationRequest,
    ModelInfo,
    SamplingOptions,
    TokenLogprob,
)

__all__ = [
    "ChoiceDelta",
    "Engine",
    "EngineDeadError",
    "EngineStats",
    "GenerationChunk",
    "GenerationRequest",
    "ModelInfo",
    "SamplingOptions",
    "TokenLogprob",
]
