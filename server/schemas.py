"""OpenAI Chat Completions wire schemas: validation only, no behaviour.

Requests ignore unknown fields (SDKs send fields a server may not know); every known field
is checked for type and range so that a bad value becomes a 400 naming the field.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Integers vLLM serializes as 64-bit (a larger one failed inside the engine, not here).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Counts (tokens, pixels) above this are never meaningful and still fit every C type.
COUNT_MAX = 2**31 - 1


class _Lenient(BaseModel):
    # NaN and infinities are no sampling values (JSON from Python clients can carry them).
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


# --- request ------------------------------------------------------------------------------


class ImageURL(_Lenient):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _bare_string(cls, value: Any) -> Any:
        # Some clients send "image_url": "https://..." instead of {"url": ...}.
        return {"url": value} if isinstance(value, str) else value


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Lenient):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=COUNT_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=COUNT_MAX)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=COUNT_MAX)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # OpenAI features this server does not implement: accepted only where they ask for
    # nothing (ChatService refuses the rest), so that a client never gets a silently different answer.
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    logit_bias: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: Any = None
    # vLLM extras users rely on
    top_k: int | None = Field(None, ge=-1, le=COUNT_MAX)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    min_tokens: int = Field(0, ge=0, le=COUNT_MAX)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    # our extensions
    grounding: bool | None = Field(
        None, description="Parse grounding boxes into choices[].message.grounding (default on)."
    )
    max_pixels: int | None = Field(
        None, ge=1, le=COUNT_MAX, description="Lower the per-image pixel ceiling for this request."
    )

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        # JSON may escape lone UTF-16 surrogates ("\ud800"); no tokenizer, serializer or
        # response encoder takes them, so they are refused here, with where they are.
        where = _surrogate_path(data)
        if where is not None:
            raise ValueError(f"{where or 'the body'} holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
                             "escape), which is not valid Unicode text")
        return data

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 16:
            raise ValueError("at most 16 stop sequences are allowed")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops


_SURROGATE = re.compile("[\ud800-\udfff]")


def _surrogate_path(value: Any, path: str = "") -> str | None:
    """Where in a parsed JSON value a string holds a lone surrogate ("" for the top), else None."""
    if isinstance(value, str):
        # isascii() first: data URLs are megabytes of ASCII, checked without a scan for the range
        return path if not value.isascii() and _SURROGATE.search(value) else None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((f"[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for key, item in items:
        if isinstance(value, dict):
            if _surrogate_path(key) is not None:
                return path or "a field name"
            key = f".{key}" if path else str(key)
        found = _surrogate_path(item, path + key)
        if found is not None:
            return found
    return None


# --- response ---------------------------------------------------------------------------


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    grounding: list[dict[str, Any]] | None = None


class Choice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    grounding: list[dict[str, Any]] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qwen-vl-serve"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
