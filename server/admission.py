"""Front-door backpressure: a bounded number of requests in process, a bounded queue behind
them, and an immediate 429 beyond that (before any image is fetched or decoded)."""

from __future__ import annotations

import asyncio

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

    async def acquire(self):
        if self.closed:
            self._metrics.admission_refused.labels("draining").inc()
            raise ServiceUnavailableError(
                "The server is shutting down and accepts no new requests; retry on another replica.",
                headers={"Retry-After": str(self._retry_after)},
            )
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
                await self._sem.acquire()
            finally:
                self._queued -= 1
                self._metrics.queued.set(self._queued)
                if self._active == 0 and self._queued == 0:
                    # (the last waiter gave up: a drain waiting for idle must not wait on)
                    self._idle.set()
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
