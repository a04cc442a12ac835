"""The load loop: send requests at a fixed concurrency or a fixed rate, bounded in count
and in time.

The loop knows nothing of HTTP: it calls `send(index)` for request indices 0, 1, ... and
collects the `RequestResult`s, so it can be driven by a fake sender in tests.
"""

from __future__ import annotations

import asyncio
import math
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
        if self.rate is not None and not (0 < self.rate < math.inf):
            raise ValueError("rate must be a positive number")
        if self.duration is not None and not (0 < self.duration < math.inf):
            raise ValueError("duration must be a positive number")
        if not (0 <= self.grace < math.inf):
            raise ValueError("grace must be a number, not negative")


@dataclass
class LoadOutcome:
    """Results in completion order, and the measured window in seconds (first request
    sent to the last result in, requests cancelled at the end left out when any other ended). `unsent`: requests of a rate-driven plan that were due before
    the duration ran out but found no free slot under the cap by then. `interrupted`: the
    `stop` event ended the run early."""

    results: list[RequestResult] = field(default_factory=list)
    duration: float = 0.0
    unsent: int = 0
    interrupted: bool = False


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


async def run_load(send: Sender, plan: LoadPlan, progress: Progress | None = None,
                   stop: asyncio.Event | None = None) -> LoadOutcome:
    """Run `plan`, calling `send(i)` once for each issued index i (in increasing order of
    issue), and `progress(result)` after each result. Setting `stop` ends the run early:
    requests in flight are cancelled (recorded as `cancelled`) and the outcome says
    `interrupted`. Never raises for a failed request; an exception raised by `send`
    itself propagates."""
    outcome = LoadOutcome()
    if stop is not None and stop.is_set():
        outcome.interrupted = True
        return outcome
    start = time.perf_counter()
    deadline = start + plan.duration if plan.duration is not None else None

    def record(result: RequestResult) -> None:
        outcome.results.append(result)
        if progress is not None:
            progress(result)

    if plan.rate is None:
        tasks = _fixed_concurrency(send, plan, deadline, record)
    else:
        tasks = _fixed_rate(send, plan, start, deadline, record, outcome)
    runner = asyncio.ensure_future(tasks)
    stopped = asyncio.ensure_future(stop.wait()) if stop is not None else None
    try:
        limit = None if deadline is None else max(0.0, deadline + plan.grace - time.perf_counter())
        await asyncio.wait([f for f in (runner, stopped) if f is not None], timeout=limit,
                           return_when=asyncio.FIRST_COMPLETED)
        outcome.interrupted = not runner.done() and stop is not None and stop.is_set()
    finally:
        for future in (runner, stopped):
            if future is not None and not future.done():
                future.cancel()
        await asyncio.gather(*(f for f in (runner, stopped) if f is not None), return_exceptions=True)
    if not runner.cancelled() and runner.exception() is not None:
        raise runner.exception()
    # The window ends with the last request that ended by itself: one cancelled at the end of
    # the grace (or by an interruption) would stretch it by up to the grace and cut every rate.
    ended = [r.finished for r in outcome.results if r.error != "cancelled"] or [r.finished for r in outcome.results]
    outcome.duration = (max(ended) - start) if ended else 0.0
    return outcome


async def _guarded(send: Sender, index: int, record: Callable[[RequestResult], None],
                   due: float | None = None) -> None:
    """Send one request; a cancellation (grace ran out) is recorded as `cancelled`. With
    `due` (its planned send time), the result records how late it went out."""
    started = time.perf_counter()
    lag = None if due is None else max(0.0, started - due)
    try:
        result = await send(index)
    except asyncio.CancelledError:
        record(RequestResult(started, time.perf_counter(), error="cancelled", send_lag=lag))
        raise
    result.send_lag = lag
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


async def _fixed_rate(send: Sender, plan: LoadPlan, start: float, deadline: float | None, record,
                      outcome: LoadOutcome) -> None:
    cap = asyncio.Semaphore(plan.concurrency) if plan.concurrency else None
    tasks: list[asyncio.Task] = []
    sent = 0

    async def one(index: int, due: float) -> None:
        nonlocal sent
        if cap is None:
            sent += 1
            await _guarded(send, index, record, due)
            return
        async with cap:  # a cancellation while waiting here leaves the request unsent
            # A request that waited for a slot past the duration is not sent ("stop
            # issuing after --duration"), but counted, so that the cap's effect shows.
            if deadline is not None and time.perf_counter() >= deadline:
                return
            sent += 1
            await _guarded(send, index, record, due)

    try:
        for index, offset in enumerate(arrival_offsets(plan)):
            at = start + offset
            if deadline is not None and at >= deadline:
                break
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(index, at)))
        await _gather_all(tasks)
    except BaseException:
        await _cancel_all(tasks)
        raise
    finally:
        # Due (before the duration ran out) but never sent: still waiting for a slot when
        # the duration ended, or when the grace ran out or the run was stopped.
        outcome.unsent = len(tasks) - sent


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
