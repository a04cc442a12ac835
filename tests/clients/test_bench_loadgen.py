"""The load loop on a fake sender: concurrency held, rate kept, bounds respected."""

from __future__ import annotations

import asyncio
import time

import pytest

from clients.loadgen import LoadPlan, arrival_offsets, run_load
from clients.stats import RequestResult


class FakeSender:
    """Answers after `latency` seconds; records indices, send times and peak in-flight."""

    def __init__(self, latency: float = 0.01) -> None:
        self.latency = latency
        self.indices: list[int] = []
        self.sent_at: list[float] = []
        self.in_flight = 0
        self.peak = 0

    async def __call__(self, index: int) -> RequestResult:
        started = time.perf_counter()
        self.indices.append(index)
        self.sent_at.append(started)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.latency)
        finally:
            self.in_flight -= 1
        return RequestResult(started, time.perf_counter(), started, started, output_tokens=1)


def run(sender, plan, progress=None):
    return asyncio.run(run_load(sender, plan, progress))


def test_fixed_concurrency_sends_each_index_once_and_holds_concurrency():
    sender = FakeSender(0.01)
    seen = []
    out = run(sender, LoadPlan(num_requests=50, concurrency=8), seen.append)
    assert sorted(sender.indices) == list(range(50))
    assert sender.peak == 8
    assert len(out.results) == 50 and len(seen) == 50
    assert out.duration > 0


def test_concurrency_above_request_count_sends_only_the_requests():
    sender = FakeSender(0.0)
    out = run(sender, LoadPlan(num_requests=3, concurrency=64))
    assert sorted(sender.indices) == [0, 1, 2] and len(out.results) == 3


def test_duration_stops_issuing():
    sender = FakeSender(0.05)
    started = time.perf_counter()
    out = run(sender, LoadPlan(num_requests=10_000, concurrency=2, duration=0.3))
    assert time.perf_counter() - started < 2.0
    assert 4 <= len(out.results) < 40


def test_grace_cancels_requests_that_outlive_the_duration():
    sender = FakeSender(10.0)
    started = time.perf_counter()
    out = run(sender, LoadPlan(num_requests=4, concurrency=2, duration=0.1, grace=0.2))
    assert time.perf_counter() - started < 3.0
    assert [r.error for r in out.results] == ["cancelled", "cancelled"]


class StuckSender(FakeSender):
    """Like FakeSender, but request `stuck` never answers."""

    def __init__(self, latency: float, stuck: int) -> None:
        super().__init__(latency)
        self.stuck = stuck

    async def __call__(self, index: int) -> RequestResult:
        if index == self.stuck:
            await asyncio.sleep(3600)
        return await super().__call__(index)


def test_a_request_cancelled_at_the_end_does_not_stretch_the_window():
    """The window ends with the last request that ended: one that hung until the grace ran
    out (and was cancelled) made it duration + grace long, cutting requests/s by as much."""
    sender = StuckSender(0.01, stuck=3)
    out = run(sender, LoadPlan(num_requests=10_000, concurrency=2, duration=0.3, grace=1.5))
    cancelled = [r for r in out.results if r.error == "cancelled"]
    finished = [r for r in out.results if r.error is None]
    assert len(cancelled) == 1 and finished
    assert out.duration < 1.0  # (0.3 s of sending and the last answer; 1.8 s with the grace)
    assert out.duration >= max(r.finished for r in finished) - min(r.started for r in out.results) - 1e-9


def test_rate_spaces_requests():
    sender = FakeSender(0.0)
    out = run(sender, LoadPlan(num_requests=6, rate=20.0, constant_rate=True))
    offsets = [t - sender.sent_at[0] for t in sender.sent_at]
    assert len(out.results) == 6
    # Open-loop schedule: request i never leaves before i x 50 ms (a stalled machine may
    # send late, never early).
    assert all(off >= i * 0.05 - 0.005 for i, off in enumerate(offsets)), offsets
    assert offsets[-1] >= 0.245


def test_rate_with_concurrency_cap():
    sender = FakeSender(0.2)
    run(sender, LoadPlan(num_requests=8, rate=1000.0, concurrency=2))
    assert sender.peak == 2 and sorted(sender.indices) == list(range(8))


def test_poisson_arrivals_are_seeded_and_average_the_rate():
    plan = LoadPlan(num_requests=2000, rate=50.0, seed=3)
    offsets = arrival_offsets(plan)
    assert offsets == arrival_offsets(plan)
    assert offsets[0] == 0.0 and offsets == sorted(offsets)
    assert offsets[-1] / (len(offsets) - 1) == pytest.approx(1 / 50, rel=0.1)
    assert arrival_offsets(LoadPlan(num_requests=5, rate=2.0, constant_rate=True)) == [0.0, 0.5, 1.0, 1.5, 2.0]


def test_sender_exception_propagates():
    async def broken(index: int) -> RequestResult:
        raise RuntimeError("bug in the sender")

    with pytest.raises(RuntimeError, match="bug in the sender"):
        run(broken, LoadPlan(num_requests=3, concurrency=2))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_requests": 0, "concurrency": 1},
        {"num_requests": 1},
        {"num_requests": 1, "concurrency": 0},
        {"num_requests": 1, "rate": 0.0},
        {"num_requests": 1, "concurrency": 1, "duration": 0.0},
        {"num_requests": 1, "concurrency": 1, "grace": -1.0},
    ],
)
def test_plan_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        LoadPlan(**kwargs)


def test_a_capped_rate_sends_nothing_after_the_duration_and_counts_what_it_could_not_send():
    # 50 requests/s due, 1 slot, each request 0.1 s: most arrivals wait for the slot.
    sender = FakeSender(0.1)
    started = time.perf_counter()
    out = run(sender, LoadPlan(num_requests=500, rate=50, constant_rate=True, concurrency=1,
                               duration=0.5, grace=2.0))
    assert all(t - started < 0.5 + 0.02 for t in sender.sent_at)  # none issued after the duration
    assert 3 <= len(out.results) <= 6
    assert out.unsent >= 15  # ~25 were due in 0.5 s: the rest are counted, not dropped silently
    lags = [r.send_lag for r in out.results]
    assert all(lag is not None for lag in lags) and max(lags) > 0.2  # the client's queue shows


def test_an_uncapped_rate_reports_a_small_send_lag_and_no_unsent():
    out = run(FakeSender(0.01), LoadPlan(num_requests=20, rate=100, constant_rate=True))
    assert out.unsent == 0 and max(r.send_lag for r in out.results) < 0.05


def test_fixed_concurrency_has_no_send_lag():
    out = run(FakeSender(0.0), LoadPlan(num_requests=5, concurrency=2))
    assert all(r.send_lag is None for r in out.results)


def test_the_stop_event_ends_the_run_with_what_ran():
    async def main():
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.3, stop.set)
        return await run_load(FakeSender(0.2), LoadPlan(num_requests=1000, concurrency=2), stop=stop)

    started = time.perf_counter()
    out = asyncio.run(main())
    assert time.perf_counter() - started < 1.0
    assert out.interrupted
    kinds = [r.error for r in out.results]
    assert kinds.count(None) >= 2 and kinds.count("cancelled") == 2  # the two in flight


def test_non_finite_numbers_are_refused():
    for bad in ({"rate": float("nan")}, {"rate": float("inf")}, {"duration": float("nan"), "concurrency": 1},
                {"grace": float("nan"), "concurrency": 1}):
        with pytest.raises(ValueError):
            LoadPlan(num_requests=1, **bad)


def test_requests_still_waiting_for_a_slot_when_the_grace_runs_out_are_counted_unsent():
    # 50/s due for 1 s, 2 slots, each request 5 s, 0.2 s of grace: 2 sent (then cancelled),
    # the ~48 others were due and never sent.
    out = run(FakeSender(5.0), LoadPlan(num_requests=500, rate=50, constant_rate=True, concurrency=2,
                                        duration=1.0, grace=0.2))
    assert [r.error for r in out.results] == ["cancelled", "cancelled"]
    assert len(out.results) + out.unsent == 50


def test_a_stop_already_set_sends_nothing():
    async def main():
        stop = asyncio.Event()
        stop.set()
        return await run_load(sender, LoadPlan(num_requests=10, concurrency=2), stop=stop)

    sender = FakeSender(0.0)
    out = asyncio.run(main())
    assert out.interrupted and not out.results and not sender.indices
