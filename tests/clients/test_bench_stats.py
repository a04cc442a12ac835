"""Statistics of the load generator: percentiles, per-request figures, the summary."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clients.stats import Distribution, RequestResult, Summary, percentile, summarize


def test_percentile_interpolates_between_ranks():
    values = [10.0, 20.0, 30.0, 40.0]
    assert percentile(values, 0) == 10.0
    assert percentile(values, 100) == 40.0
    assert percentile(values, 50) == 25.0
    assert percentile(values, 90) == pytest.approx(37.0)
    assert percentile([5.0], 99) == 5.0


def test_percentile_does_not_depend_on_order():
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0


@pytest.mark.parametrize("bad", [-1, 100.5])
def test_percentile_rejects_q_outside_range(bad):
    with pytest.raises(ValueError):
        percentile([1.0], bad)


def test_percentile_rejects_empty():
    with pytest.raises(ValueError):
        percentile([], 50)


# No deadline: the suite shares small machines with engine tests.
@settings(deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=200),
       st.floats(min_value=0, max_value=100))
def test_percentile_matches_numpy(values, q):
    assert math.isclose(percentile(values, q), float(np.percentile(values, q)), rel_tol=1e-9, abs_tol=1e-9)


@settings(deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=1e3, allow_nan=False), min_size=1, max_size=100))
def test_distribution_is_ordered(values):
    d = Distribution.of(values)
    assert d.min <= d.p50 <= d.p90 <= d.p99 <= d.max
    assert d.min <= d.mean + 1e-9 and d.mean <= d.max + 1e-9
    assert d.count == len(values)


def test_distribution_of_nothing_is_none():
    assert Distribution.of([]) is None


def test_request_figures():
    r = RequestResult(started=1.0, finished=2.0, first_token=1.25, last_token=1.85, output_tokens=5)
    assert r.ok
    assert r.ttft == pytest.approx(0.25)
    assert r.e2e == pytest.approx(1.0)
    assert r.tpot == pytest.approx(0.15)  # 0.6 s over the 4 gaps after the first token


def test_tpot_needs_two_tokens():
    assert RequestResult(0.0, 1.0, first_token=0.5, last_token=0.5, output_tokens=1).tpot is None
    assert RequestResult(0.0, 1.0).ttft is None


def test_summary_counts_rates_and_errors():
    good = [RequestResult(0.0, 1.0, 0.1 * (i + 1), 0.9, output_tokens=10, prompt_tokens=100) for i in range(4)]
    bad = [RequestResult(0.0, 0.2, error="http_429"), RequestResult(0.0, 3.0, error="timeout"),
           RequestResult(0.0, 0.1, error="http_429")]
    s = summarize(good + bad, duration=2.0, health=[0.001, 0.003], health_errors=1)
    assert (s.requests, s.succeeded) == (7, 4)
    assert s.requests_per_s == 2.0
    assert s.output_tokens_per_s == 20.0
    assert s.mean_output_tokens == 10.0
    assert s.mean_prompt_tokens == 100.0
    assert s.errors == {"http_429": 2, "timeout": 1}
    # failures take no part in latencies
    assert s.e2e.max == 1.0 and s.e2e.count == 4
    assert s.ttft.min == pytest.approx(0.1) and s.ttft.max == pytest.approx(0.4)
    assert s.health.count == 2 and s.health_errors == 1


def test_summary_of_no_success():
    s = summarize([RequestResult(0.0, 1.0, error="connect")], duration=1.0)
    assert s.succeeded == 0 and s.ttft is None and s.e2e is None and s.mean_output_tokens == 0.0
    assert s.errors == {"connect": 1}


def test_summary_zero_duration_gives_zero_rates():
    s = summarize([], duration=0.0)
    assert s.requests_per_s == 0.0 and s.output_tokens_per_s == 0.0


def test_summary_rejects_negative_duration():
    with pytest.raises(ValueError):
        summarize([], duration=-1.0)


def test_summary_round_trips_through_dict():
    s = summarize([RequestResult(0.0, 1.0, 0.2, 0.8, output_tokens=4)], duration=1.0, health=[0.01])
    assert Summary.from_dict(s.to_dict()) == s
