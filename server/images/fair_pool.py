"""A thread pool that takes its waiting jobs one owner at a time.

Decoding a picture is CPU work of up to a second or so (a 50-megapixel PNG of 150 KB, within
the decode limits), done by a few threads. First come, first served, one request with many
such pictures, or a few clients sending them, put every other request's pictures behind
theirs: a 32x32 picture waited 5 s behind 28 large ones. Here, while jobs wait, a free
worker takes the next job of the owner (a request) whose turn it is, round robin, so a
request waits for about one job of each other request ahead of it, not for all of them,
and one with many pictures gets a turn in every round however many requests come after it.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

T = TypeVar("T")

_owner: ContextVar[object | None] = ContextVar("fair_pool_owner", default=None)


@contextmanager
def owned_by(owner: object) -> Iterator[None]:
    """Jobs submitted within (and by tasks created within) this block belong to `owner`."""
    token = _owner.set(owner)
    try:
        yield
    finally:
        _owner.reset(token)


class FairPool:
    """`workers` threads; jobs start as they come while a worker is free, then in turns by
    owner (`owned_by`; jobs outside any block share one owner), round robin: owners queue in
    the order they came, and one whose job ends goes to the back of that queue. A free
    worker takes the first waiting job of the first owner in the queue with no job running,
    else of the first owner in it."""

    def __init__(self, workers: int, thread_name_prefix: str) -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=thread_name_prefix)
        self._idle = workers
        # owner -> its waiting jobs' start signals
        self._waiting: dict[object | None, deque[asyncio.Future[None]]] = {}
        # owners with jobs running or waiting, in turn order; and their running jobs
        self._order: OrderedDict[object | None, None] = OrderedDict()
        self._running: dict[object | None, int] = {}

    @property
    def waiting(self) -> int:
        """Jobs waiting for a worker."""
        return sum(map(len, self._waiting.values()))

    async def run(self, fn: Callable[[], T]) -> T:
        """`fn()` on a worker thread, once a worker is free and it is its owner's turn.
        Cancelled while waiting, it never runs; cancelled while running, it ends in its
        thread and keeps its worker until then (the next job cannot start sooner)."""
        owner = _owner.get()
        await self._turn(owner)
        loop = asyncio.get_running_loop()
        try:
            job = self._pool.submit(fn)
        except BaseException:
            self._finished(owner)
            raise
        job.add_done_callback(lambda _: _call_soon(loop, lambda: self._finished(owner)))
        return await asyncio.wrap_future(job)

    def shutdown(self) -> None:
        """Stop taking jobs; waiting ones are cancelled, running ones end in their threads."""
        for queue in self._waiting.values():
            for waiter in queue:
                waiter.cancel()
        self._waiting.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _turn(self, owner: object | None) -> None:
        self._order.setdefault(owner)
        if self._idle and not self._waiting:
            self._idle -= 1
            self._running[owner] = self._running.get(owner, 0) + 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(owner, deque()).append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._finished(owner)  # the turn came as the wait was cancelled: pass it on
            else:
                queue = self._waiting.get(owner)
                if queue is not None and waiter in queue:
                    queue.remove(waiter)
                    if not queue:
                        del self._waiting[owner]
                self._forget(owner)
            raise

    def _finished(self, owner: object | None) -> None:
        """A job of `owner` ended (or gave up its turn): the owner goes to the back of the
        queue, and the worker takes the next job."""
        self._running[owner] -= 1
        if owner in self._order:
            self._order.move_to_end(owner)
        self._forget(owner)
        while self._waiting:
            turn = next((o for o in self._order if o in self._waiting and not self._running.get(o)), None)
            if turn is None:
                turn = next(o for o in self._order if o in self._waiting)
            queue = self._waiting[turn]
            waiter = queue.popleft()
            if not queue:
                del self._waiting[turn]
            if not waiter.done():
                self._running[turn] = self._running.get(turn, 0) + 1
                waiter.set_result(None)
                return
            self._forget(turn)
        self._idle += 1

    def _forget(self, owner: object | None) -> None:
        if not self._running.get(owner) and owner not in self._waiting:
            self._running.pop(owner, None)
            self._order.pop(owner, None)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
    try:
        loop.call_soon_threadsafe(fn)
    except RuntimeError:  # the loop has closed (shutdown): nothing left to start
        pass
