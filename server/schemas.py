"""OpenAI Chat Completions wire schemas: validation only, no behaviour.

Requests ignore unknown fields (SDKs send fields a server may not know); every known field
is checked for type and range so that a bad value becomes a 400 naming the field.
"""

from __future__ import annotations

import functools
import json
import re
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from server.chat.json_schema import check_schema

# Integers vLLM serializes as 64-bit (a larger one failed inside the engine, not here).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Counts (tokens, pixels) above this are never meaningful and still fit every C type.
COUNT_MAX = 2**31 - 1
# Entries of logit_bias: OpenAI's own limit is 300; a few more cost nothing.
LOGIT_BIAS_MAX = 1024


class _Lenient(BaseModel):
    # NaN and infinities are no sampling values (JSON from Python clients can carry them).
    # strict: JSON types as OpenAI's API checks them ("stream": "yes" or "max_tokens": true
    # are errors, not coerced); an integer is still a number where a float is expected.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _as_openai_reads_it(cls, data: Any) -> Any:
        # OpenAI's API treats an explicit null in an optional field as "not given", and SDKs
        # send one wherever the caller passed None (`n=None`, `stream=None`, ...). A number
        # with nothing after the point (`100.0`) is an integer to JSON Schema, and to it.
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        if None in data.values():
            data = {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()}
        integral = [k for k, v in data.items() if type(v) is float and v.is_integer() and k in _int_fields(cls)]
        if integral:
            data = {**data, **{k: int(data[k]) for k in integral}}
        return data


@functools.cache
def _int_fields(model: type[BaseModel]) -> frozenset[str]:
    """The fields of `model` whose type is an integer (optional or not)."""
    def is_int(annotation: Any) -> bool:
        return annotation is int or any(a is int for a in typing.get_args(annotation))

    return frozenset(name for name, f in model.model_fields.items() if is_int(f.annotation))


# --- request ------------------------------------------------------------------------------


class ImageURL(_Lenient):
    url: str = Field(min_length=1)
    # "original" (newer SDKs): the picture as sent, which here means the server's ceiling, as "high"
    detail: Literal["auto", "low", "high", "original"] | None = None


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


class RefusalPart(_Lenient):
    """An earlier assistant turn's refusal, sent back as history (read as its text)."""

    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[TextPart | ImagePart | RefusalPart, Field(discriminator="type")]


class FunctionCall(_Lenient):
    name: str
    arguments: str  # JSON text, as the model wrote it


class CustomCall(_Lenient):
    name: str
    input: str  # free text, as the model wrote it


class ToolCall(_Lenient):
    """A call an earlier assistant turn made, sent back as history: a function call, or a
    custom tool's (newer SDKs), with the field its type names."""

    id: str | None = None
    type: Literal["function", "custom"] = "function"
    function: FunctionCall | None = None
    custom: CustomCall | None = None

    @model_validator(mode="after")
    def _has_its_call(self) -> "ToolCall":
        if getattr(self, self.type) is None:
            raise ValueError(f"a tool call of type '{self.type}' needs the field '{self.type}'")
        return self


class Message(_Lenient):
    # "tool" and "function" carry results of earlier tool calls in the history; this server
    # makes no tool calls itself, but such a history is rendered as the model's template does.
    role: Literal["system", "user", "assistant", "developer", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    # (assistant turns only; read there as text, so the model sees which call a result answers)
    tool_calls: list[ToolCall] | None = Field(None, max_length=128)
    function_call: FunctionCall | None = None  # OpenAI's older single call
    # An assistant turn's refusal as OpenAI answers it (the SDK's message sent back as
    # history): read as a refusal part after the content (ignored in other roles).
    refusal: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _calls_only_from_the_assistant(cls, data: Any) -> Any:
        # Other roles make no calls nor refusals: the fields are ignored there, as unknown ones are.
        if isinstance(data, dict) and data.get("role") != "assistant" and (
                "tool_calls" in data or "function_call" in data or "refusal" in data):
            data = {k: v for k, v in data.items() if k not in ("tool_calls", "function_call", "refusal")}
        return data

    @model_validator(mode="after")
    def _refusal_as_a_part(self) -> "Message":
        if self.refusal:
            if isinstance(self.content, str):
                parts = [TextPart(type="text", text=self.content)] if self.content else []
            else:
                parts = list(self.content or [])
            self.content = [*parts, RefusalPart(type="refusal", refusal=self.refusal)]
            self.refusal = None
        return self


class StreamOptions(_Lenient):
    include_usage: bool = False
    # vLLM's extension: with include_usage, every chunk carries the usage so far
    continuous_usage_stats: bool = False


#: Largest JSON schema a response_format may carry, serialized: the engine turns it into a
#: grammar on the event loop (vLLM's validation) and again in its core.
RESPONSE_SCHEMA_MAX_BYTES = 64 * 1024


class JSONSchemaFormat(_Lenient):
    """`response_format.json_schema`: OpenAI's structured outputs."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    # (`schema` is a BaseModel method's name; the field keeps the JSON key)
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @field_validator("json_schema")
    @classmethod
    def _bounded(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return _bounded_schema(value)


def _bounded_schema(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """`value` if it is a schema within RESPONSE_SCHEMA_MAX_BYTES and `check_schema`'s
    bounds; a ValueError saying what is wrong otherwise."""
    if value is None:
        return None
    if len(json.dumps(value, ensure_ascii=False).encode()) > RESPONSE_SCHEMA_MAX_BYTES:
        raise ValueError(f"the schema is larger than {RESPONSE_SCHEMA_MAX_BYTES} bytes")
    check_schema(value)
    return value


class ResponseFormat(_Lenient):
    """`response_format`: plain text, any JSON object, or JSON that follows a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object (with 'name' and 'schema')")
        return self


#: Entries of `structured_outputs.choice`, and characters in each (the engine compiles them
#: into a grammar, on the event loop and again in its core).
CHOICES_MAX, CHOICE_CHARS_MAX = 1000, 1000


class StructuredOutputs(_Lenient):
    """vLLM's `structured_outputs` extension: the answer follows a JSON schema (`json`, as an
    object or as JSON text), is any JSON object (`json_object`), or is one of `choice`.
    `regex`, `grammar` and `structural_tag` are read only to be refused (a client-written
    regular expression or grammar can take the compiler minutes)."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool | None = None
    choice: list[Annotated[str, Field(min_length=1, max_length=CHOICE_CHARS_MAX)]] | None = Field(
        None, min_length=1, max_length=CHOICES_MAX)
    regex: Any = None
    grammar: Any = None
    structural_tag: Any = None

    @field_validator("json_")
    @classmethod
    def _bounded(cls, value: dict[str, Any] | str | None) -> dict[str, Any] | None:
        if isinstance(value, str):
            if len(value.encode()) > RESPONSE_SCHEMA_MAX_BYTES:
                raise ValueError(f"the schema is larger than {RESPONSE_SCHEMA_MAX_BYTES} bytes")
            try:
                value = json.loads(value)
            except ValueError:
                raise ValueError("the schema is neither a JSON object nor JSON text of one") from None
            if not isinstance(value, dict):
                raise ValueError("the schema must be a JSON object")
        return _bounded_schema(value)

    @field_validator("choice")
    @classmethod
    def _choices_bounded(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and sum(len(c.encode()) for c in value) > RESPONSE_SCHEMA_MAX_BYTES:
            raise ValueError(f"the choices hold more than {RESPONSE_SCHEMA_MAX_BYTES} bytes in all")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> StructuredOutputs:
        kinds = [k for k in ("json", "json_object", "choice", "regex", "grammar", "structural_tag")
                 if getattr(self, "json_" if k == "json" else k) not in (None, False)]
        if len(kinds) > 1:
            raise ValueError(f"give one kind of constraint, not several ({', '.join(kinds)})")
        return self


#: Most `stop_token_ids` a request may give.
STOP_TOKEN_IDS_MAX = 1024
#: Most `allowed_token_ids` a request may give: vLLM's GPU model runner keeps 1,024 per request
#: (more stop its engine core).
ALLOWED_TOKEN_IDS_MAX = 1024
#: Most `bad_words` a request may give (vLLM's VLLM_MAX_NUM_BAD_WORDS, counted there after
#: tokenizing, with their 1,024 tokens in all), and the longest one, in characters.
BAD_WORDS_MAX = 128
BAD_WORD_MAX_CHARS = 256


class ChatCompletionRequest(_Lenient):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=COUNT_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=COUNT_MAX)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=COUNT_MAX)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    # OpenAI features this server does not implement: accepted only where they ask for
    # nothing (ChatService refuses the rest), so that a client never gets a silently different answer.
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: list[str] | None = None
    audio: Any = None
    web_search_options: dict[str, Any] | None = None  # (even {} asks for a search)
    # token id (as JSON keys are strings) -> bias added to its logit; ids checked against
    # the model's vocabulary by ChatService
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    # vLLM extras users rely on
    top_k: int | None = Field(None, ge=-1, le=COUNT_MAX)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    min_tokens: int = Field(0, ge=0, le=COUNT_MAX)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    stop_token_ids: list[Annotated[int, Field(ge=0, le=COUNT_MAX)]] | None = Field(
        None, max_length=STOP_TOKEN_IDS_MAX)
    include_stop_str_in_output: bool = False
    # only these tokens may be written; ids checked against the vocabulary by ChatService
    allowed_token_ids: list[Annotated[int, Field(ge=0, le=COUNT_MAX)]] | None = Field(
        None, min_length=1, max_length=ALLOWED_TOKEN_IDS_MAX)
    # words the answer must not contain (as vLLM bans them: their last token after the others)
    bad_words: list[Annotated[str, Field(min_length=1, max_length=BAD_WORD_MAX_CHARS)]] | None = Field(
        None, max_length=BAD_WORDS_MAX)
    # the prefix cache is shared only between requests with the same salt (tenants kept apart)
    cache_salt: str | None = Field(None, min_length=1, max_length=128)
    structured_outputs: StructuredOutputs | None = None
    # variables of the chat template (Qwen2-VL's `add_vision_id`, Qwen3's `enable_thinking`):
    # flags, numbers and null only, so that no client text reaches the prompt as template text
    chat_template_kwargs: dict[str, bool | int | float | None] | None = None
    # vLLM extras not implemented: accepted only where they ask for nothing (ChatService
    # refuses the rest), as the OpenAI features above
    echo: bool = False
    prompt_logprobs: int | None = None
    use_beam_search: bool = False
    best_of: int | None = None
    continue_final_message: bool = False
    add_generation_prompt: bool = True
    chat_template: Any = None
    mm_processor_kwargs: dict[str, Any] | None = None
    truncate_prompt_tokens: int | None = None
    priority: int = 0
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    documents: list[Any] | None = None
    thinking_token_budget: Any = None
    include_reasoning: bool = True
    logprob_token_ids: list[Any] | None = None
    repetition_detection: Any = None
    kv_transfer_params: dict[str, Any] | None = None
    media_io_kwargs: dict[str, Any] | None = None
    vllm_xargs: dict[str, Any] | None = None
    # (vLLM's own server ignores these since structured_outputs replaced them; an answer
    # that silently lacks the constraint is worse than a 400 that names the new field)
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    # our extensions
    grounding: bool | None = Field(
        None, description="Parse grounding boxes into choices[].message.grounding (default on)."
    )
    grounding_image: int | None = Field(
        None, ge=-COUNT_MAX, le=COUNT_MAX, description="Which of the request's images (0 the first, "
        "-1 the last) the answer's boxes refer to; default the last."
    )
    max_pixels: int | None = Field(
        None, ge=1, le=COUNT_MAX, description="Lower the per-image pixel ceiling for this request."
    )

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        # JSON may escape lone UTF-16 surrogates ("\ud800"); no tokenizer, serializer or
        # response encoder takes them, so they are refused here, with where they are. Only
        # the fields read are walked: an ignored field may be millions of values.
        known = ({k: v for k, v in data.items() if k in cls.model_fields and k not in _ONLY_CHECKED_FOR_PRESENCE}
                 if isinstance(data, dict) else data)
        where = _surrogate_path(known)
        if where is not None:
            # (a custom error type, so the error's `param` can name the field: a model
            # validator's errors have no location of their own)
            raise PydanticCustomError(
                "lone_surrogate",
                "holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), which is not "
                "valid Unicode text", {"where": where or "the body"})
        return data

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        if len(value) > LOGIT_BIAS_MAX:
            raise ValueError(f"at most {LOGIT_BIAS_MAX} tokens may be biased")
        for key in value:
            if not (key.isascii() and key.isdigit() and len(key) <= 32 and len(key.lstrip("0")) <= 10):
                raise ValueError(f"keys must be token ids (non-negative integers as strings), not {key[:20]!r}")
        if len({int(key) for key in value}) < len(value):
            raise ValueError("a token id is given more than once (as different strings, e.g. '15' and '015')")
        return value

    @field_validator("cache_salt")
    @classmethod
    def _salt(cls, value: str | None) -> str | None:
        # (vLLM's rule: the salt becomes part of cache keys that some backends store as paths)
        if value is not None and any(c in value for c in "@/\\\0"):
            raise ValueError("must not contain '@', '/', '\\' or NUL")
        return value

    @field_validator("stop_token_ids", "allowed_token_ids", mode="before")
    @classmethod
    def _integral_ids(cls, value: Any) -> Any:
        # (as for the integer fields: `5.0` is an integer to JSON Schema)
        if isinstance(value, list):
            return [int(v) if type(v) is float and v.is_integer() else v for v in value]
        return value

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
# Fields of features this server does not implement: ChatService only checks whether they
# ask for something, never reads their text into a prompt or a message, so the surrogate
# walk skips them (a 50 MB `tools` array took it 10 s on the event loop, only to be refused).
_ONLY_CHECKED_FOR_PRESENCE = frozenset({
    "tools", "tool_choice", "functions", "function_call", "modalities", "audio",
    "web_search_options", "chat_template", "mm_processor_kwargs", "guided_json", "guided_regex",
    "guided_choice", "guided_grammar", "documents", "thinking_token_budget", "logprob_token_ids",
    "repetition_detection", "kv_transfer_params", "media_io_kwargs", "vllm_xargs",
})


def _surrogate_path(value: Any) -> str | None:
    """Where in a parsed JSON value a string holds a lone surrogate ("" for the top), else None.

    Walks with its own stack of iterators, not recursion (JSON nested a thousand levels deep
    parses, and must not end in a RecursionError here), so the memory it takes grows with
    the depth, not with the number of values."""
    if isinstance(value, str):
        return "" if _lone_surrogate(value) else None
    if not isinstance(value, (dict, list)):
        return None
    keys: list[Any] = []  # the path to the container whose entries the top iterator yields
    walks = [_entries(value)]
    while walks:
        entry = next(walks[-1], None)
        if entry is None:
            walks.pop()
            if keys:
                keys.pop()
            continue
        key, child = entry
        if isinstance(key, str) and _lone_surrogate(key):
            return _spelled(keys) or "a field name"
        if isinstance(child, str):
            if _lone_surrogate(child):
                return _spelled([*keys, key])
        elif isinstance(child, (dict, list)):
            keys.append(key)
            walks.append(_entries(child))
    return None


def _lone_surrogate(text: str) -> bool:
    # isascii() first: data URLs are megabytes of ASCII, checked without a scan for the range
    return not text.isascii() and _SURROGATE.search(text) is not None


def _entries(container: dict[str, Any] | list[Any]) -> typing.Iterator[tuple[Any, Any]]:
    return iter(container.items()) if isinstance(container, dict) else enumerate(container)


def _spelled(keys: list[Any]) -> str:
    path = ""
    for key in keys:
        if isinstance(key, int):
            path += f"[{key}]"
        else:
            key = key if len(key) <= 40 else key[:40] + "..."  # a client's key, echoed short
            path += f".{key}" if path else key
    return path


# --- response ---------------------------------------------------------------------------


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None = None
    refusal: list[TokenLogprobOut] | None = None  # (OpenAI's field; this server writes no refusals)


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None  # (OpenAI's field, null here as in its answers without a refusal)
    grounding: list[dict[str, Any]] | None = None


class Choice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None
    # vLLM's extension: the stop string or stop token id that ended the answer, null for the
    # model's own end (and for every other finish)
    stop_reason: int | str | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # read from the engine's prefix cache, not computed again


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


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
    stop_reason: int | str | None = None  # (as Choice's; sent with the finish_reason)


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
