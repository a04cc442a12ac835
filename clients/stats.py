"""Per-request measurements and their summary (throughput, latency percentiles, errors).

Times are `time.perf_counter()` seconds. A request's time to first token (TTFT) runs from
just before its request was sent to its first content-bearing chunk; time per output token
(TPOT) is `(last content chunk - first content chunk) / (output tokens - 1)`, so it excludes
the first token; end-to-end latency (E2E) runs to the end of the stream.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

#: The percentiles every distribution reports.
PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    """What one request did. `error` is None for a success, else a short kind such as
    `http_429`, `timeout` or `stream_error` (see `clients.sse`)."""

    started: float
    finished: float
    first_token: float | None = None
    last_token: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None
    error: str | None = None
    #: False when the stream sent no usage chunk and its tokens were counted as chunks
    tokens_from_usage: bool = True
    #: rate-driven runs: seconds from the request's due time to its sending (waiting for
    #: a free slot under the concurrency cap, or for the event loop); None otherwise
    send_lag: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def e2e(self) -> float:
        return self.finished - self.started

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.started

    @property
    def tpot(self) -> float | None:
        """None when fewer than two tokens arrived (no interval to measure)."""
        if self.first_token is None or self.last_token is None or self.output_tokens < 2:
            return None
        return (self.last_token - self.first_token) / (self.output_tokens - 1)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (the
    default of numpy.percentile). Raises ValueError for an empty sequence or q outside
    0..100."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Distribution:
    """count, mean, min, max and the `PERCENTILES` of a sample, in its own unit."""

    count: int
    mean: float
    min: float
    max: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: Iterable[float]) -> "Distribution | None":
        """None for an empty sample."""
        sample = list(values)
        if not sample:
            return None
        p50, p90, p99 = (percentile(sample, q) for q in PERCENTILES)
        return cls(len(sample), sum(sample) / len(sample), min(sample), max(sample), p50, p90, p99)


@dataclass
class Summary:
    """The figures of one run. Rates count successful requests (and their tokens) per
    second of `duration` (the measured window: first request sent to last response
    finished); latencies are in seconds. `unsent`: requests a rate-driven run had due
    (before `--duration` ran out) but never sent: every slot under the cap stayed busy
    until the duration, the grace or the run ended.
    `tokens_estimated`: successful requests without a usage chunk, whose tokens were
    counted as content chunks. `send_lag`: how late rate-driven requests went out."""

    requests: int
    succeeded: int
    duration: float
    requests_per_s: float
    output_tokens_per_s: float
    mean_output_tokens: float
    mean_prompt_tokens: float | None
    ttft: Distribution | None
    tpot: Distribution | None
    e2e: Distribution | None
    errors: dict[str, int] = field(default_factory=dict)
    health: Distribution | None = None
    health_errors: int = 0
    unsent: int = 0
    tokens_estimated: int = 0
    send_lag: Distribution | None = None
    warmup_errors: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Summary":
        """Inverse of `to_dict` (for reading saved results)."""
        data = dict(data)
        for key in ("ttft", "tpot", "e2e", "health", "send_lag"):
            if data.get(key) is not None:
                data[key] = Distribution(**data[key])
        return cls(**data)


def summarize(
    results: Sequence[RequestResult],
    duration: float,
    health: Sequence[float] = (),
    health_errors: int = 0,
    unsent: int = 0,
    warmup: Sequence[RequestResult] = (),
) -> Summary:
    """Summarize `results` measured over `duration` seconds; failed requests count in
    `errors` (by kind) and in no latency figure. `health` holds probe latencies in
    seconds; `warmup`, the unmeasured requests, count only in `warmup_errors`. Raises
    ValueError for a negative duration."""
    if duration < 0:
        raise ValueError("duration must not be negative")
    good = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in good)
    prompts = [r.prompt_tokens for r in good if r.prompt_tokens is not None]
    rate = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    return Summary(
        requests=len(results),
        succeeded=len(good),
        duration=duration,
        requests_per_s=rate(len(good)),
        output_tokens_per_s=rate(tokens),
        mean_output_tokens=tokens / len(good) if good else 0.0,
        mean_prompt_tokens=sum(prompts) / len(prompts) if prompts else None,
        ttft=Distribution.of(r.ttft for r in good if r.ttft is not None),
        tpot=Distribution.of(r.tpot for r in good if r.tpot is not None),
        e2e=Distribution.of(r.e2e for r in good),
        errors=_error_counts(results),
        health=Distribution.of(health),
        health_errors=health_errors,
        unsent=unsent,
        tokens_estimated=sum(not r.tokens_from_usage for r in good),
        send_lag=Distribution.of(r.send_lag for r in results if r.send_lag is not None),
        warmup_errors=_error_counts(warmup),
    )


def _error_counts(results: Iterable[RequestResult]) -> dict[str, int]:
    return dict(sorted(Counter(r.error for r in results if r.error is not None).items()))
