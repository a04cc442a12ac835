"""The interface between the HTTP layer and an inference engine.

The server speaks only these types. `VLLMEngine` adapts vLLM's `AsyncLLM` to them; tests may
supply a scripted engine that yields chosen text through the same server code.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image


class EngineDeadError(RuntimeError):
    """The engine can no longer serve; the process should exit so it is restarted."""


class EngineSettingsError(ValueError):
    """The engine refused the settings it was given (a `--max-model-len` beyond the model's,
    a device this build cannot use): the operator's mistake, told in one line, not a crash."""


@dataclass(frozen=True)
class ModelInfo:
    """What the server needs to know about the loaded model."""

    family: str  # "qwen-vl" | "qwen2-vl" | "qwen2.5-vl" | "qwen3-vl" | other model_type
    max_model_len: int
    tokenizer: Any  # a Hugging Face style tokenizer (apply_chat_template, encode, decode)
    model_type: str = ""
    image_processor: dict[str, Any] = field(default_factory=dict)  # min_pixels, max_pixels, ...
    stop_token_ids: tuple[int, ...] = ()  # end a chat turn besides the tokenizer's EOS
    #: The checkpoint's sampling defaults for fields a request leaves out, by SamplingOptions
    #: name (temperature, top_p, top_k, min_p, repetition_penalty, presence_penalty,
    #: frequency_penalty, max_tokens); empty: neutral defaults.
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    #: Token ids the model has logits for (may exceed the tokenizer's); None: the tokenizer's.
    vocab_size: int | None = None


@dataclass
class SamplingOptions:
    """Sampling settings, already validated. `max_tokens=None` means "up to the context"."""

    max_tokens: int | None = None
    #: With `max_tokens=None`: generate at most this many (the model's default length),
    #: fewer where the context ends first.
    default_max_tokens: int | None = None
    #: The request field `max_tokens` came from, for error messages (OpenAI has two).
    max_tokens_field: str = "max_tokens"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives; None: no logprobs
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    #: The answer must be JSON following this schema (OpenAI's response_format json_schema).
    json_schema: dict[str, Any] | None = None
    #: The answer must be a JSON object (response_format json_object).
    json_object: bool = False
    #: The answer must be one of these strings (vLLM's structured_outputs.choice).
    choice: list[str] | None = None
    #: The request field the constraint above came from, for error messages.
    constraint_param: str = "response_format"
    #: Token ids that end the answer, besides the model's own.
    stop_token_ids: list[int] = field(default_factory=list)
    #: A matched stop string stays at the end of the answer (vLLM's extension).
    include_stop_str_in_output: bool = False
    #: Only these token ids may be written (None: any).
    allowed_token_ids: list[int] | None = None
    #: Words the answer must not contain.
    bad_words: list[str] = field(default_factory=list)


@dataclass
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    images: Sequence[Image.Image]
    sampling: SamplingOptions
    #: One stable id per image (equal ids only for equal pixels), or empty: the engine
    #: then identifies images by hashing their pixels.
    image_ids: Sequence[str] = ()
    #: Prefix-cache entries are shared only between requests with the same salt (None: no salt).
    cache_salt: str | None = None


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    #: (token, logprob, bytes) of the most likely tokens; bytes None where unknown.
    top: list[tuple[str, float, bytes | None]] = field(default_factory=list)
    #: The token's own bytes (a piece of a UTF-8 character has no text of its own); None
    #: where the tokenizer does not say, and then the UTF-8 of `token` stands in.
    bytes: bytes | None = None


@dataclass
class ChoiceDelta:
    """New output of one choice since the previous chunk."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    #: What ended a "stop": the stop string or stop token id that matched; None for the
    #: model's end-of-sequence token (vLLM's `stop_reason`).
    stop_reason: int | str | None = None
    #: A copy of another choice's output (greedy n > 1 runs once in the engine and is copied
    #: to every choice): the client gets its tokens, the engine made none.
    copy: bool = False


@dataclass
class GenerationChunk:
    prompt_tokens: int
    choices: list[ChoiceDelta]
    finished: bool
    cached_tokens: int = 0  # prompt tokens found in the engine's prefix cache


#: Tokens with logprobs in one delta beyond which turning it into events is done off the
#: event loop. A delta is one token while its client keeps up; a stream whose client stalls
#: gets every token made meanwhile merged into one delta (vLLM's DELTA outputs), and
#: converting 10,000 tokens with 20 alternatives each held the loop, /health with it, 3 s.
LARGE_DELTA_TOKENS = 256


@dataclass(frozen=True)
class EngineStats:
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0


class Engine(abc.ABC):
    """An inference engine. `generate` streams deltas; cancelling its iteration aborts the
    request in the engine (so a disconnected client stops costing compute)."""

    info: ModelInfo

    @abc.abstractmethod
    async def start(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Check and prepare the request, then return the stream of its deltas.

        Everything that can be refused is refused here, before any output (so the HTTP
        layer can still answer with a 4xx status): `server.errors.ContextLengthError` for a
        prompt or max_tokens beyond the context, `server.errors.InvalidRequestError` when the
        engine cannot process the input, `EngineDeadError`. The stream yields until every
        choice has finished; closing it early aborts the request in the engine, so a
        client that goes away stops costing compute.
        """

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None: ...

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...

    @property
    @abc.abstractmethod
    def is_dead(self) -> bool: ...

    @abc.abstractmethod
    async def check_health(self) -> None:
        """Raise `EngineDeadError` when the engine cannot serve."""

    @abc.abstractmethod
    def num_unfinished_requests(self) -> int: ...

    def last_output_at(self) -> float | None:
        """`time.monotonic()` when the engine last handed out anything (any request's output,
        or a step's statistics); None when it cannot tell. Read to find an engine that is
        alive but makes no progress (a hung device, a frozen process)."""
        return None

    @abc.abstractmethod
    async def shutdown(self) -> None: ...
