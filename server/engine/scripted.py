"""An engine that answers with scripted text, for exercising the real server code paths
(HTTP, streaming, grounding, errors) without a model. Tiny random models never write
grounding boxes; this one writes exactly what a test asks for.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator

from server.engine.base import (
    ChoiceDelta,
    Engine,
    EngineDeadError,
    EngineStats,
    GenerationChunk,
    GenerationRequest,
    ModelInfo,
    TokenLogprob,
)
from server.errors import ContextLengthError


class ScriptedEngine(Engine):
    """Replies come from `enqueue(text)` (first in, first out) or the default reply.

    Each reply is streamed in pieces of `chunk_chars` characters, `delay` seconds apart;
    `max_tokens` counts pieces, so a short budget ends with finish_reason "length". Each
    piece is one token: with logprobs asked for, it has logprob -0.5 and is the first of its
    top alternatives, then "alt0", "alt1", ... at -1, -2, ...
    Every request is recorded in `.history`.
    """

    def __init__(self, info: ModelInfo, default_reply: str = "ok", chunk_chars: int = 3, delay: float = 0.0) -> None:
        self.info = info
        self.default_reply = default_reply
        self.chunk_chars = chunk_chars
        self.delay = delay
        self.history: list[GenerationRequest] = []
        self._replies: deque[str | tuple[str, str, int | None]] = deque()
        self._running: set[str] = set()
        self.aborted: list[str] = []
        self.dead = False
        self.last_output: float | None = None

    def enqueue(self, *replies: str) -> None:
        self._replies.extend(replies)

    def enqueue_cut(self, reply: str, finish_reason: str, only_choice: int | None = None) -> None:
        """A reply the engine gives up on: its pieces, then `finish_reason` ("abort" or
        "error", as vLLM ends a request it cancelled or failed) on the last one. With
        `only_choice`, that choice alone ends so, on the first piece, and the others go on."""
        self._replies.append((reply, finish_reason, only_choice))

    async def start(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if self.dead:
            raise EngineDeadError("scripted engine marked dead")
        n_prompt = len(request.prompt_token_ids)
        if n_prompt >= self.info.max_model_len:
            raise ContextLengthError("The prompt is longer than the context.", param="messages")
        self.history.append(request)
        reply = self._replies.popleft() if self._replies else self.default_reply
        cut = only = None
        if isinstance(reply, tuple):
            reply, cut, only = reply
        return self._stream(request, reply, n_prompt, cut, only)

    async def _stream(self, request: GenerationRequest, reply: str, n_prompt: int,
                      cut: str | None = None, only: int | None = None) -> AsyncIterator[GenerationChunk]:
        s = request.sampling
        pieces = [reply[i : i + self.chunk_chars] for i in range(0, len(reply), self.chunk_chars)] or [""]
        budget = s.max_tokens if s.max_tokens is not None else (s.default_max_tokens or len(pieces))
        emitted = pieces[:budget]
        finish = (cut if only is None else None) or ("length" if len(pieces) > budget else "stop")
        self._running.add(request.request_id)
        try:
            for i, piece in enumerate(emitted):
                if self.delay:
                    await asyncio.sleep(self.delay)
                if self.dead:
                    raise EngineDeadError("scripted engine marked dead")
                last = i == len(emitted) - 1
                logprobs = None if s.logprobs is None else [TokenLogprob(
                    token=piece, logprob=-0.5,
                    top=[(piece, -0.5, None)] + [(f"alt{j}", -1.0 - j, None) for j in range(s.logprobs)])]
                choices = []
                for k in range(s.n):
                    if k == only:  # this choice ended on the first piece
                        if i == 0:
                            choices.append(ChoiceDelta(index=k, text=piece, token_ids=[0], logprobs=logprobs,
                                                       finish_reason=cut))
                        continue
                    choices.append(ChoiceDelta(index=k, text=piece, token_ids=[0], logprobs=logprobs,
                                               finish_reason=finish if last else None))
                self.last_output = time.monotonic()
                yield GenerationChunk(prompt_tokens=n_prompt, choices=choices, finished=last)
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted.append(request.request_id)
            raise
        finally:
            self._running.discard(request.request_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self._running))

    @property
    def is_dead(self) -> bool:
        return self.dead

    async def check_health(self) -> None:
        if self.dead:
            raise EngineDeadError("scripted engine marked dead")

    def num_unfinished_requests(self) -> int:
        return len(self._running)

    def last_output_at(self) -> float | None:
        return self.last_output

    async def shutdown(self) -> None:
        return None
