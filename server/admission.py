"""Front-door backpressure: a bounded number of requests in process, a bounded queue behind
them, and an immediate 429 beyond that (before any image is fetched or decoded); and a bound
on the request-body bytes held over all requests at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from server.errors import RateLimitError, ServiceUnavailableError
from server.metrics import Metrics


class Admission:
    """`await acquire()` returns a release callback; call it exactly once when done."""

    def __init__(self, max_concurrent: int, max_queued: int, metrics: Metrics, retry_after: int = 1) -> None:
        self._sem = asyncio.Semaphore(max_concurrent)
        self._max_queued = max_queued
        self._queued = 0
        self._active = 0
        self._metrics = metrics
        self._retry_after = retry_after
        self.closed = False
        self._closing = asyncio.Event()  # set by turn_away_queue(): waiters leave with a 503
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def active(self) -> int:
        return self._active

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def would_wait(self) -> bool:
        """True when `acquire()` would queue (every processing slot is taken)."""
        return self._sem.locked()

    def close(self) -> None:
        """Admit nothing new (a drain): new requests get a 503, which a load balancer or the
        SDK retries on another replica; those in the queue still get their turn."""
        self.closed = True

    def turn_away_queue(self) -> None:
        """Closed, and the requests still waiting in the queue get the 503 at once (a drain
        out of time: admitted now, they would only be cut off, with nothing to retry)."""
        self.close()
        self._closing.set()

    def _refuse_closed(self) -> ServiceUnavailableError:
        self._metrics.admission_refused.labels("draining").inc()
        return ServiceUnavailableError(
            "The server is shutting down and accepts no new requests; retry on another replica.",
            headers={"Retry-After": str(self._retry_after)},
        )

    async def _wait_for_slot(self) -> None:
        """The semaphore, or `_refuse_closed()` if the admission closes first."""
        slot = asyncio.ensure_future(self._sem.acquire())
        closing = asyncio.ensure_future(self._closing.wait())
        acquired = False
        try:
            await asyncio.wait({slot, closing}, return_when=asyncio.FIRST_COMPLETED)
            if not closing.done():
                acquired = True
                return
        finally:
            closing.cancel()
            if not acquired:
                slot.cancel()
                if slot.done() and not slot.cancelled():
                    self._sem.release()  # got it as the wait ended: not ours to keep
        raise self._refuse_closed()

    async def acquire(self, *, before_close: bool = False):
        """A slot (queued for one first when all are taken). `before_close`: the request
        arrived before `close()`, so a drain still takes it in (until `turn_away_queue()`)."""
        if self.closed and not before_close:
            raise self._refuse_closed()
        if self._sem.locked():
            if self._queued >= self._max_queued:
                self._metrics.admission_refused.labels("queue_full").inc()
                raise RateLimitError(
                    "The server is at capacity (all processing slots busy and the queue full); "
                    "retry after a short wait.",
                    headers={"Retry-After": str(self._retry_after)},
                )
            self._queued += 1
            self._metrics.queued.set(self._queued)
            try:
                await self._wait_for_slot()
            except BaseException:
                self._queued -= 1
                self._metrics.queued.set(self._queued)
                if self._active == 0 and self._queued == 0:
                    # (the last waiter gave up: a drain waiting for idle must not wait on)
                    self._idle.set()
                raise
            # Got its slot: counted active before it stops counting as queued, with nothing
            # awaited in between, so a drain waiting for idle never sees both at zero.
            self._active += 1
            self._queued -= 1
            self._metrics.queued.set(self._queued)
        else:
            await self._sem.acquire()
            self._active += 1
        self._idle.clear()
        self._metrics.admitted.inc()
        self._metrics.inflight.set(self._active)
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self._active -= 1
            self._metrics.inflight.set(self._active)
            self._sem.release()
            if self._active == 0 and self._queued == 0:
                self._idle.set()

        return release

    async def wait_idle(self) -> None:
        """Return once no request is admitted or queued."""
        await self._idle.wait()


class BodyCutoff:
    """The request bodies still arriving, for the end of a drain: `cut()` ends the wait of
    each one at once, and of any later one (their requests get a 503)."""

    def __init__(self) -> None:
        self.done = False
        self._waits: set[asyncio.Timeout] = set()

    @contextlib.asynccontextmanager
    async def timeout(self, seconds: float) -> AsyncIterator[None]:
        """`asyncio.timeout(seconds)`, which `cut()` also ends (TimeoutError either way)."""
        async with asyncio.timeout(seconds) as wait:
            self._waits.add(wait)
            try:
                yield
            finally:
                self._waits.discard(wait)

    def cut(self) -> None:
        self.done = True
        now = asyncio.get_running_loop().time()
        for wait in list(self._waits):
            wait.reschedule(now)


class BodyBudget:
    """The request-body bytes the server holds at once, over all requests, up to `limit`.

    Bodies are read, parsed and their data URLs decoded before a request is admitted (its
    size and shape are checked first), and each costs several times its size in memory while
    that runs: 32 bodies of 60 MB at once took the process 2.7 GB above its idle size. The
    per-request cap alone leaves the sum to the number of connections. Each request draws on
    the budget as its body arrives (not as its Content-Length declares, so a client that
    declares much and sends little holds little); a request whose next part does not fit
    gets a 429 and loses its connection, and the others go on.

    The first `allowance` bytes of every body are free: a few clients holding the budget
    with large bodies sent slowly (each part just inside the body timeout) must not shut
    out the ordinary requests of everyone else, nor can queued large requests."""

    def __init__(self, limit: int, metrics: Metrics, retry_after: int = 1, allowance: int = 1 << 20) -> None:
        self.limit = limit
        self.allowance = allowance
        self.held = 0
        self._metrics = metrics
        self._retry_after = retry_after

    def ticket(self) -> BodyTicket:
        return BodyTicket(self)


class BodyTicket:
    """One request's share of a `BodyBudget`. `take(n)` as parts of its body arrive;
    `release()` (idempotent) once the body's data is no longer held: when the request is
    ready for the engine, and in any case when it ends."""

    def __init__(self, budget: BodyBudget) -> None:
        self._budget = budget
        self.held = 0
        self._free = budget.allowance

    def take(self, n: int) -> None:
        """Count `n` more bytes; raises `BodyBudgetError` (429) and releases this request's
        share when they do not fit."""
        budget = self._budget
        free = min(n, self._free)
        self._free -= free
        n -= free
        if not n:
            return
        if budget.held + n > budget.limit:
            self.release()
            budget._metrics.admission_refused.labels("body_budget").inc()
            raise BodyBudgetError(
                "The server holds too many large request bodies at once; retry after a short "
                "wait, or send images by URL instead of as data URLs.",
                headers={"Retry-After": str(budget._retry_after), "Connection": "close"},
            )
        budget.held += n
        self.held += n
        budget._metrics.body_bytes_held.set(budget.held)

    def release(self) -> None:
        if self.held:
            self._budget.held -= self.held
            self.held = 0
            self._budget._metrics.body_bytes_held.set(self._budget.held)


class BodyBudgetError(RateLimitError):
    """429: the request's body would take the server over its `BodyBudget`."""
