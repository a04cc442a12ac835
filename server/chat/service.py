"""The chat-completions service: request → images → prompt → engine → response or SSE.

Handlers stay thin: they call `ChatService.prepare` (everything that can fail with a 4xx
happens there, before any response byte is sent) and then `complete` or `stream`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydantic_core import to_json

from server.chat.prompt import Conversation, PromptRenderer, collect
from server.chat.specials import SpecialTokenFilter
from server.chat.sse import json_string, sse_done, sse_event
from server.engine.base import (
    LARGE_DELTA_TOKENS,
    Engine,
    GenerationChunk,
    GenerationRequest,
    SamplingOptions,
    TokenLogprob,
)
from server.errors import (
    APIError,
    ContextLengthError,
    InternalError,
    InvalidRequestError,
    ModelNotFoundError,
    ServiceUnavailableError,
    shown,
)
from server.metrics import Metrics
from server.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    DeltaMessage,
    Message,
    PromptTokensDetails,
    RefusalPart,
    ResponseMessage,
    TextPart,
    TokenLogprobOut,
    TopLogprob,
    Usage,
)
from server.settings import Settings

log = logging.getLogger(__name__)

# Text averages a few characters per token with these tokenizers; 32 leaves room for long
# runs of one character, which single tokens cover. More text than max_model_len * 32 is
# refused without tokenizing it.
MAX_CHARS_PER_TOKEN = 32
# Prompts with less text than this are tokenized on the event loop (2-5 ms at worst, for
# emoji and grounding tags, on the 2-core CI machine); longer ones on a thread (ChatService._render).
RENDER_INLINE_CHARS = 2048
# Answers with less text than this are read for grounding boxes on the event loop (2-15 us a
# character, loaded); longer ones on a thread: a dense OCR answer of 150 KB took 0.2 s.
GROUNDING_INLINE_CHARS = 2048

GROUNDING_FAMILIES = ("qwen-vl", "qwen2-vl", "qwen2.5-vl", "qwen3-vl")


@dataclass
class Prepared:
    """A validated request, ready for the engine."""

    completion_id: str
    model: str
    created: int
    request: ChatCompletionRequest
    stream: Any  # AsyncIterator[GenerationChunk] from Engine.start
    image_sizes: list[tuple[int, int]]
    model_image_sizes: list[tuple[int, int]]
    grounding: bool
    started: float
    #: Fields for the request's access-log line (tokens; how a stream ended), written as the
    #: response is made. The handler passes the log's own dict, so a stream's fields arrive
    #: after the handler has returned.
    stats: dict[str, Any] = field(default_factory=dict)
    # Removes special tokens from the text (whole, or across deltas with `pieces()`).
    clean: SpecialTokenFilter | None = None  # None: the engine skips special tokens itself
    #: The request field that constrains the answer's shape (response_format,
    #: structured_outputs), if one does.
    constraint: str | None = None
    #: The prompt ends inside an open `<think>` block (a thinking model's template opens it):
    #: the answer begins with reasoning, and has none until the model writes `</think>`.
    reasoning_open: bool = False


class ChatService:
    def __init__(self, settings: Settings, engine: Engine, images: Any, metrics: Metrics, model_names: list[str]) -> None:
        self.settings = settings
        self.engine = engine
        self.images = images
        self.metrics = metrics
        self.model_names = model_names
        self.renderer = PromptRenderer(engine.info.tokenizer)
        # one thread: tokenizers are not all safe to call from several at once
        self._render_thread = ThreadPoolExecutor(1, thread_name_prefix="prompt")
        self.specials = SpecialTokenFilter(engine.info.tokenizer)
        self._think_ids = _think_token_ids(engine.info.tokenizer)

    # --- preparation --------------------------------------------------------------------

    async def prepare(self, req: ChatCompletionRequest, request_id: str, started: float | None = None) -> Prepared:
        """Validate, load images, render the prompt and submit it to the engine. `started`
        (`time.perf_counter()`) is when the request arrived, by default now: the deadline and
        the latency metrics count from it.

        Raises an `APIError` (4xx) for anything the client must fix.
        """
        started = time.perf_counter() if started is None else started
        model = self._check_model(req.model)
        s = self.settings
        self.check_message_count(len(req.messages), sum(map(_parts, req.messages)))
        if req.n > s.max_n:
            raise InvalidRequestError(f"n is {req.n}; at most {s.max_n} is allowed.", param="n")
        if req.top_logprobs and not req.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true.", param="top_logprobs")
        _refuse_unsupported(req)
        # The text as sent, before collect() decodes and re-encodes each tool call's arguments
        # on the event loop (a 54 MB history of calls took 16 s there before this check).
        self._check_text_size(_raw_texts(req.messages))
        conv = collect(req.messages, split_reasoning=self.renderer.splits_reasoning)
        self._check_text_size(conv.texts)
        self.images.check_count(len(conv.images))
        if req.grounding_image is not None and not -len(conv.images) <= req.grounding_image < len(conv.images):
            raise InvalidRequestError(
                f"grounding_image is {req.grounding_image}, but the request has {len(conv.images)} image(s).",
                param="grounding_image")
        # (before any image is fetched: a request refused for its sampling fields costs nothing)
        sampling = self._sampling(req)
        loaded = []
        if conv.images:
            loaded = await self.images.load_all(
                [ref.url for ref in conv.images],
                params=[ref.param for ref in conv.images],
                details=[ref.detail for ref in conv.images],
                max_pixels=req.max_pixels,
            )
        prompt_ids = await self._render(conv, req.chat_template_kwargs)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        clean = None
        if req.skip_special_tokens and self.specials.active:
            sampling.skip_special_tokens = False
            clean = self.specials
        stream = await self.engine.start(
            GenerationRequest(
                request_id=f"{completion_id}-{request_id}",
                prompt_token_ids=prompt_ids,
                images=[img.image for img in loaded],
                sampling=sampling,
                image_ids=[img.pixels_id for img in loaded],
                cache_salt=req.cache_salt,
            )
        )
        grounding = s.grounding if req.grounding is None else req.grounding
        return Prepared(
            completion_id=completion_id,
            model=model,
            created=int(time.time()),
            # (without its messages: their data URLs, up to --max-request-bytes, are of no use
            # while the answer is generated)
            request=req.model_copy(update={"messages": []}),
            stream=stream,
            image_sizes=[img.original_size for img in loaded],
            model_image_sizes=[img.image.size for img in loaded],
            grounding=grounding and self.engine.info.family in GROUNDING_FAMILIES,
            started=started,
            clean=clean,
            constraint=sampling.constraint_param
            if sampling.json_schema is not None or sampling.json_object or sampling.choice is not None else None,
            reasoning_open=self._opens_reasoning(prompt_ids),
        )

    def _opens_reasoning(self, prompt_ids: list[int]) -> bool:
        """Whether the prompt's generation prompt opened a `<think>` block and left it open
        (Qwen3-VL Thinking's does; with `enable_thinking: false` it closes it again). Only
        the ids after the last `<|im_start|>` count: the template's own assistant header.
        (`<think>` is an ordinary token, so a client's text can hold it; never after that
        special token, which client text cannot.)"""
        if self._think_ids is None:
            return False
        opening, closing, turn_start = self._think_ids
        tail = prompt_ids[-8:]  # ("<|im_start|>assistant\n<think>\n": near the end)
        if turn_start not in tail or opening not in tail:
            return False
        header = tail[len(tail) - tail[::-1].index(turn_start):]
        if opening not in header:
            return False
        return closing not in header[header.index(opening):]

    async def _render(self, conv: Conversation, template_kwargs: dict[str, Any] | None) -> list[int]:
        """The prompt's token ids. Long texts are rendered and tokenized on a thread of their
        own: at the size limit (about 32 characters per context token) one request took the
        event loop 0.5 s at a 4,096-token context, and every other client with it."""
        if sum(map(len, conv.texts)) < RENDER_INLINE_CHARS:
            return self.renderer.render(conv, template_kwargs)
        return await asyncio.get_running_loop().run_in_executor(
            self._render_thread, self.renderer.render, conv, template_kwargs)

    def check_message_count(self, count: int, parts: int = 0) -> None:
        """A 400 if a request holds more messages, or more content parts over all of its
        messages, than the server takes. Cheap, so it runs before the messages are validated:
        each message and part costs Python work on the event loop from there on."""
        limit = self.settings.max_messages
        if count > limit:
            raise InvalidRequestError(
                f"Too many messages: {count} sent, at most {limit} allowed.",
                param="messages",
                code="too_many_messages",
            )
        limit = self.settings.max_content_parts
        if parts > limit:
            raise InvalidRequestError(
                f"Too many content parts: the messages hold {parts} (tool calls included), at most "
                f"{limit} allowed.",
                param="messages",
                code="too_many_content_parts",
            )

    def _check_text_size(self, texts: Iterable[str]) -> None:
        """Refuse, before tokenizing, text that cannot fit the context. Tokenizing runs on the
        event loop; 30 MB of text took 86 s there, with every other request waiting."""
        limit = self.engine.info.max_model_len * MAX_CHARS_PER_TOKEN
        size = sum(map(len, texts))
        if size > limit:
            raise ContextLengthError(
                f"The messages hold {size} characters of text; this model's context of "
                f"{self.engine.info.max_model_len} tokens cannot hold more than about {limit}.",
                param="messages",
            )

    def _check_model(self, name: str | None) -> str:
        if not name or name in self.model_names:  # (vLLM too takes "" for the default)
            return self.model_names[0]
        raise ModelNotFoundError(
            f"The model '{shown(name)}' does not exist on this server; available: "
            + ", ".join(self.model_names)
            + ".",
            param="model",
        )

    def _sampling(self, req: ChatCompletionRequest) -> SamplingOptions:
        """The request's sampling settings; a field it leaves out takes the model's default
        (its generation config, as vLLM's server applies it), else the neutral one."""
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        stop = req.stop or []
        if req.min_tokens and max_tokens is not None and req.min_tokens > max_tokens:
            limit = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
            raise InvalidRequestError(f"min_tokens must not exceed {limit}.", param="min_tokens")
        defaults = self.engine.info.sampling_defaults

        def pick(name: str, neutral: Any) -> Any:
            value = getattr(req, name)
            return value if value is not None else defaults.get(name, neutral)

        top_k = pick("top_k", 0)
        top_p = pick("top_p", 1.0)
        if top_p == 0:  # OpenAI's API takes 0 as "the most likely token only"; vLLM refuses 0
            top_p, top_k = 1.0, 1
        return SamplingOptions(
            max_tokens=max_tokens,
            default_max_tokens=defaults.get("max_tokens"),
            max_tokens_field="max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens",
            temperature=pick("temperature", 1.0),
            top_p=top_p,
            top_k=0 if top_k == -1 else top_k,  # -1 and 0 both mean "no top-k"
            min_p=pick("min_p", 0.0),
            n=req.n,
            stop=list(stop),
            seed=req.seed,
            presence_penalty=pick("presence_penalty", 0.0),
            frequency_penalty=pick("frequency_penalty", 0.0),
            repetition_penalty=pick("repetition_penalty", 1.0),
            min_tokens=req.min_tokens,
            ignore_eos=req.ignore_eos,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            skip_special_tokens=req.skip_special_tokens,
            logit_bias=self._logit_bias(req),
            stop_token_ids=self._token_ids(req.stop_token_ids, "stop_token_ids"),
            include_stop_str_in_output=req.include_stop_str_in_output,
            allowed_token_ids=self._token_ids(req.allowed_token_ids, "allowed_token_ids") or None,
            bad_words=list(req.bad_words or ()),
            **_output_constraint(req),
        )

    def _vocabulary(self) -> int:
        info = self.engine.info
        return info.vocab_size or len(info.tokenizer)

    def _logit_bias(self, req: ChatCompletionRequest) -> dict[int, float] | None:
        """`logit_bias` by integer token id; a 400 for an id the model has no logit for."""
        if not req.logit_bias:
            return None
        vocab = self._vocabulary()
        bias = {int(key): value for key, value in req.logit_bias.items()}
        outside = sorted(t for t in bias if t >= vocab)
        if outside:
            raise InvalidRequestError(
                f"logit_bias names token id {outside[0]}, but this model's vocabulary has ids 0 to {vocab - 1}.",
                param="logit_bias",
            )
        return bias

    def _token_ids(self, given: list[int] | None, param: str) -> list[int]:
        """Token ids a request gives (`stop_token_ids`, `allowed_token_ids`), without repeats,
        each one checked against the model's vocabulary."""
        if not given:
            return []
        ids = list(dict.fromkeys(given))
        vocab = self._vocabulary()
        outside = [t for t in ids if t >= vocab]
        if outside:
            raise InvalidRequestError(
                f"{param} names token id {outside[0]}, but this model's vocabulary has ids 0 to {vocab - 1}.",
                param=param,
            )
        return ids

    # --- responses ----------------------------------------------------------------------

    async def complete(self, p: Prepared) -> bytes:
        """Run to the end and build the non-streaming response: a `ChatCompletion`, as JSON."""
        n = p.request.n
        texts = [[] for _ in range(n)]
        # Each delta's logprobs as the JSON they end as, not as objects: about 3 KB of Python
        # objects per token with 20 alternatives (and as much again for the response models)
        # against 1.4 KB of JSON; n=8 x 3,000 tokens took the process 420 MB up at its peak.
        logprobs: list[list[bytes]] | None = [[] for _ in range(n)] if p.request.logprobs else None
        top_k = p.request.top_logprobs or 0
        last_logprobs: tuple[Any, bytes] = (None, b"")  # (copies of a greedy answer share theirs)
        finish: list[str | None] = [None] * n
        stop_reasons: list[int | str | None] = [None] * n
        tokens = [0] * n
        tracker = _Timing(self.metrics, p.started)
        prompt_tokens = cached = 0
        try:
            async for chunk in p.stream:
                prompt_tokens = chunk.prompt_tokens or prompt_tokens
                cached = max(cached, chunk.cached_tokens)
                for c in chunk.choices:
                    tracker.tokens(len(c.token_ids), c.index, c.copy)
                    texts[c.index].append(c.text)
                    tokens[c.index] += len(c.token_ids)
                    if c.logprobs and logprobs is not None:
                        if c.logprobs is not last_logprobs[0]:
                            part = (await asyncio.to_thread(_logprobs_json, c.logprobs, top_k)
                                    if len(c.logprobs) > LARGE_DELTA_TOKENS else _logprobs_json(c.logprobs, top_k))
                            last_logprobs = (c.logprobs, part)
                        logprobs[c.index].append(last_logprobs[1])
                    if c.finish_reason:
                        finish[c.index] = _finish_reason(c.finish_reason, p.constraint)
                        stop_reasons[c.index] = c.stop_reason
        finally:  # (tokens the engine made count whether or not the answer is whole)
            tracker.record_tokens(prompt_tokens)
            p.stats.update(prompt_tokens=prompt_tokens, completion_tokens=sum(tokens))
        tracker.done()

        def build() -> bytes:
            # The response's JSON in pieces joined once: the logprobs' pieces and the whole,
            # never a third copy. (JSON escapes every quote inside a string, so the fields'
            # own `"choices":[]` and `"logprobs":null` are the only places these can match.)
            usage = _usage(prompt_tokens, sum(tokens), cached)
            envelope = ChatCompletion(id=p.completion_id, created=p.created, model=p.model, choices=[],
                                      usage=usage).model_dump_json().encode()
            head, tail = envelope.split(b'"choices":[]', 1)
            pieces = [head, b'"choices":[']
            for i in range(n):
                # Cleaned whole: a special token can be split between two deltas.
                text = "".join(texts[i])
                if p.clean:
                    text = p.clean(text)
                choice = Choice(
                    index=i,
                    message=ResponseMessage(content=text, grounding=self._grounding(p, text)),
                    finish_reason=finish[i] or "stop",
                    stop_reason=stop_reasons[i],
                ).model_dump_json().encode()
                if i:
                    pieces.append(b",")
                if logprobs is None:
                    pieces.append(choice)
                    continue
                before, after = choice.split(b'"logprobs":null', 1)
                pieces += [before, b'"logprobs":{"content":[']
                for j, part in enumerate(logprobs[i]):
                    pieces += [b",", part] if j else [part]
                pieces += [b'],"refusal":null}', after]
            pieces += [b"]", tail]
            return b"".join(pieces)

        long_answer = p.grounding and p.image_sizes and sum(len(piece) for pieces in texts for piece in pieces) >= GROUNDING_INLINE_CHARS
        if p.request.logprobs or long_answer:
            # Up to n x max_tokens x 21 logprob entries to join (megabytes), or a long answer
            # to read boxes from: off the event loop, which would
            # otherwise answer nobody else meanwhile.
            return await asyncio.to_thread(build)
        return build()

    async def stream(self, p: Prepared) -> AsyncIterator[str]:
        """SSE events: a role chunk per choice, content deltas, a finish chunk per choice
        (carrying the grounding boxes), an optional usage chunk, then `[DONE]`. An error
        before the first event is raised (the response has not begun: an HTTP error); after
        it, it becomes an error event followed by `[DONE]`."""
        n = p.request.n
        options = p.request.stream_options
        include_usage = bool(options and options.include_usage)
        # (vLLM's extension: every chunk carries the usage so far)
        continuous = include_usage and options.continuous_usage_stats
        tracker = _Timing(self.metrics, p.started)
        texts = [[] for _ in range(n)]
        tokens = [0] * n
        prompt_tokens = cached = 0
        pieces = [p.clean.pieces() if p.clean else None for _ in range(n)]
        deltas = None if continuous or p.request.logprobs else _DeltaEvents(p)

        def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
            if usage is None and continuous:  # (each chunk is one choice's: its tokens so far, as vLLM counts)
                usage = _usage(prompt_tokens, tokens[choices[0].index] if choices else sum(tokens), cached)
            return sse_event(_chunk_json(p, choices, usage))

        def roles() -> list[str]:
            return [chunk([ChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))]) for i in range(n)]

        # The events of one engine output go out as one write (one send per output, not per
        # event): the role chunks with the first output, and the events of the output that
        # finishes the last choice with the usage chunk and [DONE]. Each write is a syscall and
        # a pass through the ASGI stack; on a busy front end they were a third of its event
        # loop's time (text only, 64 streams). The response head goes out with the first
        # (api.event_stream.EventStreamResponse).
        unfinished = n
        sent = False  # whether any event has been yielded
        # (with usage in every chunk, the role chunks are made once the prompt's size is known)
        held = [] if continuous else roles()
        waiting_roles = n  # role chunks held until there is a first event to send with them
        # (the finally also runs when the stream is closed early: a deadline, a drain, the
        # client gone; tokens the engine made count, and the access log names them)
        try:
            try:
                async for out in p.stream:
                    if unfinished == 0 and held:  # an output after the last finish: not expected
                        yield "".join(held)
                        held, sent = [], True
                    prompt_tokens = out.prompt_tokens or prompt_tokens
                    cached = max(cached, out.cached_tokens)
                    if continuous and waiting_roles and not held:
                        held = roles()
                    for c in out.choices:
                        tracker.tokens(len(c.token_ids), c.index, c.copy)
                        tokens[c.index] += len(c.token_ids)
                        # The tokens of an output that ends in "error" are never sent: they are
                        # the ones a grammar refused (vLLM's other errors come without tokens).
                        refused = c.finish_reason == "error"
                        text = "" if refused else c.text
                        if (cleaner := pieces[c.index]) is not None:
                            text = cleaner.feed(text) + (cleaner.flush() if c.finish_reason else "")
                        texts[c.index].append(text)
                        if not (text or (c.logprobs and not refused)):
                            pass  # (nothing to send for this output)
                        elif deltas is not None:
                            held.append(deltas.event(c.index, text))
                        else:
                            def event(c=c, text=text) -> str:
                                return chunk([ChunkChoice(index=c.index, delta=DeltaMessage(content=text),
                                                          logprobs=self._logprobs(p, c.logprobs or []))])

                            held.append(await asyncio.to_thread(event) if len(c.logprobs or ()) > LARGE_DELTA_TOKENS
                                        else event())
                        if c.finish_reason:
                            unfinished -= 1
                            text = "".join(texts[c.index])
                            boxes = (await asyncio.to_thread(self._grounding, p, text)
                                     if p.grounding and p.image_sizes and len(text) >= GROUNDING_INLINE_CHARS
                                     else self._grounding(p, text))
                            held.append(chunk([ChunkChoice(index=c.index, delta=DeltaMessage(grounding=boxes),
                                                           finish_reason=_finish_reason(c.finish_reason, p.constraint),
                                                           stop_reason=c.stop_reason)]))
                    if len(held) > waiting_roles and unfinished > 0:
                        yield "".join(held)
                        held, waiting_roles, sent = [], 0, True
            except APIError as exc:
                stream_ended_with(p.stats, exc)
                if not sent:
                    raise
                held += [sse_event(exc.to_dict()), sse_done()]
                yield "".join(held)
                return
            usage = _usage(prompt_tokens, sum(tokens), cached)
            tracker.done()
            if include_usage:
                held.append(chunk([], usage))
            held.append(sse_done())
            yield "".join(held)
        finally:
            tracker.record_tokens(prompt_tokens)
            p.stats.update(prompt_tokens=prompt_tokens, completion_tokens=sum(tokens))

    def _logprobs(self, p: Prepared, items: list[TokenLogprob]) -> ChoiceLogprobs | None:
        if not p.request.logprobs:
            return None
        k = p.request.top_logprobs or 0
        return ChoiceLogprobs(
            content=[
                TokenLogprobOut(
                    token=lp.token,
                    logprob=lp.logprob,
                    bytes=_bytes(lp.token, lp.bytes),
                    top_logprobs=[TopLogprob(token=t, logprob=v, bytes=_bytes(t, b)) for t, v, b in lp.top[:k]],
                )
                for lp in items
            ]
        )

    def _grounding(self, p: Prepared, text: str) -> list[dict[str, Any]] | None:
        if not p.grounding:
            return None
        try:
            from server.grounding import parse_grounding
        except ImportError:  # grounding package not installed in this build
            return None
        info = self.engine.info
        if p.reasoning_open:  # the answer's own text lacks the opening tag the prompt holds
            text = "<think>" + text
        boxes = parse_grounding(
            text,
            info.family,
            p.image_sizes,
            model_sizes=p.model_image_sizes,
            min_pixels=info.image_processor.get("min_pixels"),
            max_pixels=info.image_processor.get("max_pixels"),
            image_index=p.request.grounding_image,
        )
        return [b.to_dict() for b in boxes]


def _chunk_json(p: Prepared, choices: list[ChunkChoice], usage: Usage | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": p.completion_id,
        "object": "chat.completion.chunk",
        "created": p.created,
        "model": p.model,
        "choices": [
            {
                "index": c.index,
                "delta": c.delta.model_dump(exclude_none=True),
                "finish_reason": c.finish_reason,
                "logprobs": c.logprobs.model_dump() if c.logprobs is not None else None,
                **({"stop_reason": c.stop_reason} if c.finish_reason else {}),
            }
            for c in choices
        ],
        "system_fingerprint": None,  # (OpenAI's chunks carry both fields, null when unset)
    }
    if usage is not None:
        body["usage"] = usage.model_dump()
    elif p.request.stream_options and p.request.stream_options.include_usage:
        body["usage"] = None  # as OpenAI: every chunk has the field, the last one fills it
    return body


class _DeltaEvents:
    """The SSE events of one stream's content deltas when they carry neither logprobs nor
    usage so far: by far the most common event, made from a template rather than through the
    schemas and `json.dumps` (0.3 us against 9 an event; at 64 streams the event loop's
    thread is the limit). The template is the general path's own event for a marker, so the
    two write the same bytes."""

    __slots__ = ("_p", "_parts")

    def __init__(self, p: Prepared) -> None:
        self._p = p
        self._parts: dict[int, tuple[str, str]] = {}

    def event(self, index: int, text: str) -> str:
        parts = self._parts.get(index)
        if parts is None:
            marker = uuid.uuid4().hex
            whole = sse_event(_chunk_json(self._p, [ChunkChoice(index=index, delta=DeltaMessage(content=marker))], None))
            before, after = whole.split(f'"{marker}"')
            parts = self._parts[index] = (before, after)
        return parts[0] + json_string(text) + parts[1]


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


def stream_ended_with(log_fields: dict[str, Any], err: APIError) -> None:
    """Note in a request's access-log fields that its stream (HTTP 200) ended with `err`'s
    error event: the log and the outcome counters then count it as that error."""
    log_fields.update(error=err.code or err.type, error_status=err.status)


def _finish_reason(reason: str, constraint: str | None = None) -> str:
    """The OpenAI finish_reason for an engine's, or the error for a choice that did not end.

    An answer the engine gave up on must not reach the client as a complete one: "error"
    (vLLM's retryable request-level failure, which its own server answers with a 500) is a
    500, and "abort" (the engine cancelled the request itself: it is shutting down or paused
    generation; our own aborts have no one left to read them) a 503. The official OpenAI SDKs
    retry both. Other reasons (vLLM's "repetition") end the answer as a stop would.

    `constraint`: the request field that constrains the answer's shape, if any. vLLM ends
    such a request with "error" when its grammar reaches a point where no token may follow
    (a string pattern that matches nothing, say): sending it again cannot help, so that is
    the client's 400, naming the field."""
    if reason == "error" and constraint:
        log.info("the engine ended a constrained answer with an error: the %s allows no answer", constraint)
        raise InvalidRequestError(
            f"The {constraint} allows no answer: generation reached a point where the grammar lets no "
            f"token follow (for example a string pattern that matches nothing). Check the schema.",
            param=constraint, code=f"invalid_{constraint}")
    if reason == "error":
        log.error("the engine failed a request during generation")
        raise InternalError("The engine failed while generating this answer; send the request again.",
                            code="generation_failed")
    if reason == "abort":
        raise ServiceUnavailableError("The server stopped generating this answer before it was complete; "
                                      "send the request again.", code="generation_aborted",
                                      headers={"Retry-After": "1"})
    return reason if reason in ("stop", "length") else "stop"


class _Timing:
    """Time to first token, time per output token and end-to-end latency of one request.
    With n choices, generated side by side, the time per output token is per choice's token
    (the longest choice's count), not per token of all choices together."""

    def __init__(self, metrics: Metrics, started: float) -> None:
        self.metrics = metrics
        self.started = started
        self.first: float | None = None
        self.counts: dict[int, int] = {}
        self.generated = 0  # by the engine: copied choices' tokens left out
        self.recorded = False

    def tokens(self, n: int, index: int, copy: bool = False) -> None:
        if n and self.first is None:
            self.first = time.perf_counter()
            self.metrics.ttft.observe(self.first - self.started)
        self.counts[index] = self.counts.get(index, 0) + n
        if not copy:
            self.generated += n

    def done(self) -> None:
        """The request answered in full: its latencies."""
        now = time.perf_counter()
        self.metrics.e2e.observe(now - self.started)
        steps = max(self.counts.values(), default=0)
        if self.first is not None and steps > 1:
            self.metrics.tpot.observe((now - self.first) / (steps - 1))

    def record_tokens(self, prompt_tokens: int) -> None:
        """The tokens the engine read and made for the request, answered in full or not
        (once; a prompt the engine never reported, 0, is not observed)."""
        if self.recorded:
            return
        self.recorded = True
        self.metrics.completion_tokens.inc(self.generated)
        if prompt_tokens:
            self.metrics.prompt_tokens.inc(prompt_tokens)
            self.metrics.prompt_tokens_per_request.observe(prompt_tokens)


def _parts(msg: Message) -> int:
    """A message's content parts and tool calls (as `max_content_parts` counts them)."""
    return ((len(msg.content) if isinstance(msg.content, list) else 0)
            + len(msg.tool_calls or ()) + (msg.function_call is not None))


def _raw_texts(messages: list[Message]) -> Iterator[str]:
    """Every piece of text in `messages` as sent: contents, refusals, tool calls' names and
    arguments (at most a few characters short of what the prompt will hold of them)."""
    for msg in messages:
        if isinstance(msg.content, str):
            yield msg.content
        elif msg.content:
            for part in msg.content:
                if isinstance(part, TextPart):
                    yield part.text
                elif isinstance(part, RefusalPart):
                    yield part.refusal
        for call in msg.tool_calls or ():
            if call.function:
                yield call.function.name
                yield call.function.arguments
            elif call.custom:
                yield call.custom.name
                yield call.custom.input
        if msg.function_call:
            yield msg.function_call.name
            yield msg.function_call.arguments


def _output_constraint(req: ChatCompletionRequest) -> dict[str, Any]:
    """SamplingOptions' fields for the shape the answer must take: from `response_format`
    (a schema, or any JSON object, also for a json_schema without its schema, as OpenAI
    reads one) or from vLLM's `structured_outputs` (a schema, any JSON object, one of a
    list of strings); not both."""
    fmt, so = req.response_format, req.structured_outputs
    constraint: dict[str, Any] = {}
    if fmt is not None and fmt.type != "text":
        if fmt.type == "json_schema" and fmt.json_schema is not None and fmt.json_schema.json_schema is not None:
            constraint = {"json_schema": fmt.json_schema.json_schema}
        else:
            constraint = {"json_object": True}
    if so is not None:
        for name in ("regex", "grammar", "structural_tag"):
            if getattr(so, name) is not None:
                raise InvalidRequestError(
                    f"structured_outputs.{name} is not supported by this server (json, json_object and "
                    f"choice are).", param=f"structured_outputs.{name}", code="unsupported_parameter")
        asked = ({"json_schema": so.json_} if so.json_ is not None else {"json_object": True} if so.json_object
                 else {"choice": so.choice} if so.choice is not None else {})
        if asked and constraint:
            raise InvalidRequestError("Give response_format or structured_outputs, not both.",
                                      param="structured_outputs")
        if asked:
            constraint = {**asked, "constraint_param": "structured_outputs"}
    if constraint and req.ignore_eos:
        # (the grammar ends with the answer; the engine would go on writing unconstrained text)
        what = "structured_outputs" if "constraint_param" in constraint else "a JSON response_format"
        raise InvalidRequestError(f"ignore_eos cannot be combined with {what}.", param="ignore_eos")
    return constraint


#: vLLM's own extensions this server does not implement: (field, what it is, whether a
#: request asks for it).
_VLLM_NOT_IMPLEMENTED: tuple[tuple[str, str, Any], ...] = (
    ("echo", "echo (the last message repeated before the answer)", lambda r: r.echo),
    ("prompt_logprobs", "prompt_logprobs", lambda r: r.prompt_logprobs is not None),
    ("use_beam_search", "Beam search", lambda r: r.use_beam_search),
    ("best_of", "best_of above n", lambda r: r.best_of is not None and r.best_of > r.n),
    ("continue_final_message", "continue_final_message (continuing the last assistant message)",
     lambda r: r.continue_final_message),
    ("add_generation_prompt", "add_generation_prompt: false", lambda r: not r.add_generation_prompt),
    ("chat_template", "A chat template in the request (the server uses the model's own)",
     lambda r: r.chat_template is not None),
    ("mm_processor_kwargs", "mm_processor_kwargs (image size is set with max_pixels or image_url.detail)",
     lambda r: bool(r.mm_processor_kwargs)),
    ("truncate_prompt_tokens", "truncate_prompt_tokens", lambda r: r.truncate_prompt_tokens is not None),
    ("priority", "Request priority", lambda r: bool(r.priority)),
    ("return_tokens_as_token_ids", "return_tokens_as_token_ids", lambda r: bool(r.return_tokens_as_token_ids)),
    ("return_token_ids", "return_token_ids", lambda r: bool(r.return_token_ids)),
    ("documents", "documents (retrieval context for the chat template)", lambda r: bool(r.documents)),
    ("thinking_token_budget", "thinking_token_budget", lambda r: r.thinking_token_budget is not None),
    ("include_reasoning", "include_reasoning: false (the answer's reasoning is not separated here)",
     lambda r: not r.include_reasoning),
    ("logprob_token_ids", "logprob_token_ids", lambda r: r.logprob_token_ids is not None),
    ("repetition_detection", "repetition_detection", lambda r: r.repetition_detection is not None),
    ("kv_transfer_params", "kv_transfer_params (disaggregated prefill)", lambda r: r.kv_transfer_params is not None),
    ("media_io_kwargs", "media_io_kwargs (the server loads images itself)", lambda r: bool(r.media_io_kwargs)),
    ("vllm_xargs", "vllm_xargs (arguments for custom logits processors)", lambda r: bool(r.vllm_xargs)),
)


def _think_token_ids(tokenizer: Any) -> tuple[int, int, int] | None:
    """The ids of `<think>`, `</think>` and `<|im_start|>` where the tokenizer has all three
    as single tokens."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # (a tokenizer without a readable vocabulary has no such tokens to find)
        return None
    ids = tuple(vocab.get(token) for token in ("<think>", "</think>", "<|im_start|>"))
    return ids if all(isinstance(i, int) for i in ids) else None  # type: ignore[return-value]


def _refuse_unsupported(req: ChatCompletionRequest) -> None:
    """A 400 for OpenAI features this server does not implement, where the request asks for
    them: ignoring them would return an answer the client did not ask for (plain text where
    it required a tool call or JSON)."""
    def refuse(what: str, param: str) -> None:
        raise InvalidRequestError(f"{what} is not supported by this server.", param=param, code="unsupported_parameter")

    if req.tools and req.tool_choice != "none":
        refuse("Tool calling", "tools")
    if req.tool_choice not in (None, "none", "auto"):  # a tool call demanded, tools or not
        refuse("Tool calling", "tool_choice")
    if req.functions and req.function_call != "none":
        refuse("Function calling", "functions")
    if req.function_call not in (None, "none", "auto"):
        refuse("Function calling", "function_call")
    if req.web_search_options is not None:
        refuse("Web search", "web_search_options")
    if (req.modalities and set(req.modalities) != {"text"}) or req.audio is not None:
        refuse("Output other than text", "modalities")
    if req.stream_options is not None and not req.stream:
        raise InvalidRequestError("stream_options is only allowed when stream is true.", param="stream_options")
    for name, what, asks in _VLLM_NOT_IMPLEMENTED:
        if asks(req):
            refuse(what, name)
    # (vLLM's server lets chat_template_kwargs override these two, so asking there asks too)
    template_kwargs = req.chat_template_kwargs or {}
    if template_kwargs.get("continue_final_message"):
        refuse("continue_final_message (continuing the last assistant message)",
               "chat_template_kwargs.continue_final_message")
    if template_kwargs.get("add_generation_prompt") is not None and not template_kwargs["add_generation_prompt"]:
        refuse("add_generation_prompt: false", "chat_template_kwargs.add_generation_prompt")
    for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
        if getattr(req, name) is not None:
            raise InvalidRequestError(
                f"{name} is not supported (vLLM replaced it); use response_format, or structured_outputs "
                f"with json, json_object or choice.", param=name, code="unsupported_parameter")


def _bytes(token: str, raw: bytes | None) -> list[int]:
    return list(raw if raw is not None else token.encode("utf-8"))


def _logprobs_json(items: list[TokenLogprob], k: int) -> bytes:
    """`items` as the comma-separated entries of a `ChoiceLogprobs.content` list, as the
    schema's models would write them (plain dicts through pydantic's serializer: a quarter
    of the time of building the models)."""
    return to_json([
        {"token": lp.token, "logprob": lp.logprob, "bytes": _bytes(lp.token, lp.bytes),
         "top_logprobs": [{"token": t, "logprob": v, "bytes": _bytes(t, b)} for t, v, b in lp.top[:k]]}
        for lp in items
    ])[1:-1]
