"""`FairPool`: jobs start as they come while a worker is free, then by owner in turns; a job
cancelled while waiting never runs, one cancelled while running keeps its worker until it
ends."""

from __future__ import annotations

import asyncio
import threading

import pytest

from server.images.fair_pool import FairPool, owned_by


class GatedJobs:
    """`job(name)`: a job that records its start in `started` and ends when `gates[name]` is set."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.gates: dict[str, threading.Event] = {}

    def job(self, name: str):
        self.gates[name] = threading.Event()

        def work():
            self.started.append(name)
            self.gates[name].wait(10)
            return name
        return work


def test_waiting_jobs_start_one_owner_at_a_time():
    async def run():
        pool = FairPool(1, "test")
        jobs = GatedJobs()
        started, gates, job = jobs.started, jobs.gates, jobs.job
        tasks = []
        for owner, names in (("a", ["a1", "a2", "a3"]), ("b", ["b1", "b2"]), ("c", ["c1"])):
            with owned_by(owner):
                tasks += [asyncio.create_task(pool.run(job(n))) for n in names]
            await asyncio.sleep(0.05)
        assert started == ["a1"] and pool.waiting == 5
        for _ in range(6):
            while not started or not gates.get(started[-1]):
                await asyncio.sleep(0.01)
            gates[started[-1]].set()
            await asyncio.sleep(0.05)
        assert await asyncio.gather(*tasks) == ["a1", "a2", "a3", "b1", "b2", "c1"]
        pool.shutdown()
        return started

    assert asyncio.run(run()) == ["a1", "b1", "c1", "a2", "b2", "a3"]


def test_cancelled_jobs():
    async def run():
        pool = FairPool(1, "test")
        ran, release = [], threading.Event()

        def blocking():
            ran.append("blocking")
            release.wait(10)

        running = asyncio.create_task(pool.run(blocking))
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(pool.run(lambda: ran.append("queued")))
        await asyncio.sleep(0.05)
        queued.cancel()
        running.cancel()  # it runs on in its thread, and holds the worker
        for task in (queued, running):
            with pytest.raises(asyncio.CancelledError):
                await task
        after = asyncio.create_task(pool.run(lambda: ran.append("after") or "done"))
        await asyncio.sleep(0.1)
        assert ran == ["blocking"] and not after.done()
        release.set()
        assert await after == "done"
        assert pool.waiting == 0 and pool._idle == 1
        pool.shutdown()
        return ran

    assert asyncio.run(run()) == ["blocking", "after"]


def test_a_failing_job_frees_its_worker():
    async def run():
        pool = FairPool(1, "test")
        with pytest.raises(ZeroDivisionError):
            await pool.run(lambda: 1 / 0)
        assert await pool.run(lambda: 7) == 7
        pool.shutdown()

    asyncio.run(run())


def test_an_owner_with_many_jobs_is_not_starved_by_new_owners():
    """Owners that come while an owner's jobs wait queue behind it: a request with many
    pictures gets a turn in every round, however many one-picture requests keep coming."""
    async def run():
        pool = FairPool(1, "test")
        jobs = GatedJobs()
        started, gates, job = jobs.started, jobs.gates, jobs.job

        def submit(owner, name):
            with owned_by(owner):
                return asyncio.create_task(pool.run(job(name)))

        async def finish(name):
            gates[name].set()
            await asyncio.sleep(0.05)

        tasks = [submit("a", n) for n in ("a1", "a2", "a3")]
        await asyncio.sleep(0.05)
        tasks += [submit("b", "b1"), submit("c", "c1")]
        await asyncio.sleep(0.05)
        await finish("a1")  # b1 starts
        tasks.append(submit("d", "d1"))  # comes while a waits: after a's next turn
        await asyncio.sleep(0.05)
        for name in ("b1", "c1", "a2", "d1", "a3"):
            await finish(name)
        await asyncio.gather(*tasks)
        pool.shutdown()
        return started

    assert asyncio.run(run()) == ["a1", "b1", "c1", "a2", "d1", "a3"]
