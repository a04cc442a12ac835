"""The load loop: send requests at a fixed concurrency or a fixed rate, bounded in count
and in time.

The loop knows nothing of HTTP: it calls `send(index)` for request indices 0, 1, ... and
collects the `RequestResult`s, so it can be driven by a fake sender in tests.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from clients.stats import RequestResult

Sender = Callable[[int], Awaitable[RequestResult]]
Progress = Callable[[RequestResult], None]

#: Seconds in-flight requests may take to finish after the duration ran out.
DEFAULT_GRACE = 30.0


@dataclass(frozen=True)
class LoadPlan:
    """How to send `num_requests` requests.

    Exactly one of `concurrency` (that many requests always in flight) and `rate`
    (requests per second, Poisson arrivals unless `constant_rate`) drives the loop; with
    `rate`, `concurrency` may also be set as a cap on requests in flight. `duration` stops
    issuing new requests after that many seconds; requests still in flight then get
    `grace` more seconds, after which they are cancelled and recorded as `cancelled`.
    """

    num_requests: int
    concurrency: int | None = None
    rate: float | None = None
    constant_rate: bool = False
    duration: float | None = None
    grace: float = DEFAULT_GRACE
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError("num_requests must be at least 1")
        if self.concurrency is None and self.rate is None:
            raise ValueError("give a concurrency or a rate")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be positive")
        if self.duration is not None and self.duration <= 0:
            raise ValueError("duration must be positive")
        if self.grace < 0:
            raise ValueError("grace must not be negative")


@dataclass
class LoadOutcome:
    """Results in completion order, and the measured window in seconds (first request
    sent to last result in)."""

    results: list[RequestResult] = field(default_factory=list)
    duration: float = 0.0


def arrival_offsets(plan: LoadPlan) -> list[float]:
    """Send times (seconds after the start) of the requests of a rate-driven plan:
    exponential gaps of mean 1/rate (seeded), or equal gaps with `constant_rate`."""
    assert plan.rate is not None
    rng = random.Random(plan.seed)
    t, out = 0.0, []
    for _ in range(plan.num_requests):
        out.append(t)
        t += 1 / plan.rate if plan.constant_rate else rng.expovariate(plan.rate)
    return out


async def run_load(send: Sender, plan: LoadPlan, progress: Progress | None = None) -> LoadOutcome:
    """Run `plan`, calling `send(i)` once for each issued index i (in increasing order of
    issue), and `progress(result)` after each result. Never raises for a failed request;
    an exception raised by `send` itself propagates."""
    outcome = LoadOutcome()
    start = time.perf_counter()
    deadline = start + plan.duration if plan.duration is not None else None

    def record(result: RequestResult) -> None:
        outcome.results.append(result)
        if progress is not None:
            progress(result)

    if plan.rate is None:
        tasks = _fixed_concurrency(send, plan, deadline, record)
    else:
        tasks = _fixed_rate(send, plan, start, deadline, record)
    runner = asyncio.ensure_future(tasks)
    try:
        if deadline is None:
            await runner
        else:
            await asyncio.wait_for(asyncio.shield(runner), deadline + plan.grace - time.perf_counter())
    except asyncio.TimeoutError:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    finally:
        if not runner.done():
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
    outcome.duration = (max(r.finished for r in outcome.results) - start) if outcome.results else 0.0
    return outcome


async def _guarded(send: Sender, index: int, record: Callable[[RequestResult], None]) -> None:
    """Send one request; a cancellation (grace ran out) is recorded as `cancelled`."""
    started = time.perf_counter()
    try:
        result = await send(index)
    except asyncio.CancelledError:
        record(RequestResult(started, time.perf_counter(), error="cancelled"))
        raise
    record(result)


async def _fixed_concurrency(send: Sender, plan: LoadPlan, deadline: float | None, record) -> None:
    counter = iter(range(plan.num_requests))

    async def worker() -> None:
        for index in counter:  # a shared iterator: each index is taken by one worker
            if deadline is not None and time.perf_counter() >= deadline:
                return
            await _guarded(send, index, record)

    workers = [asyncio.create_task(worker()) for _ in range(min(plan.concurrency, plan.num_requests))]
    await _gather_all(workers)


async def _fixed_rate(send: Sender, plan: LoadPlan, start: float, deadline: float | None, record) -> None:
    cap = asyncio.Semaphore(plan.concurrency) if plan.concurrency else None
    tasks: list[asyncio.Task] = []

    async def one(index: int) -> None:
        if cap is None:
            await _guarded(send, index, record)
            return
        async with cap:
            await _guarded(send, index, record)

    try:
        for index, offset in enumerate(arrival_offsets(plan)):
            at = start + offset
            if deadline is not None and at >= deadline:
                break
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(index)))
    except BaseException:
        await _cancel_all(tasks)
        raise
    await _gather_all(tasks)


async def _gather_all(tasks: list[asyncio.Task]) -> None:
    """Wait for all `tasks`. If this wait is cancelled, or one task fails, cancel the
    others and wait for them to record their cancellation before re-raising."""
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        await _cancel_all(tasks)
        raise


async def _cancel_all(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
