"""Human-readable output of a run: the summary table, a progress indicator, JSON."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clients.stats import Distribution, RequestResult, Summary

_MS = 1000.0


def _ms(d: Distribution | None) -> list[str]:
    if d is None:
        return ["-"] * 4
    return [f"{v * _MS:.1f}" for v in (d.mean, d.p50, d.p90, d.p99)]


def format_summary(s: Summary, title: str = "qwen-vl-bench") -> str:
    """A fixed-width table of the figures of `s` (latencies in milliseconds)."""
    prompt = "-" if s.mean_prompt_tokens is None else f"{s.mean_prompt_tokens:.1f}"
    unsent = f" ({s.unsent} more were due but never sent: no free slot under the cap in time)" if s.unsent else ""
    lines = [
        title,
        f"  requests        {s.requests} sent, {s.succeeded} succeeded, in {s.duration:.2f} s{unsent}",
        f"  throughput      {s.requests_per_s:.2f} req/s, {s.output_tokens_per_s:.1f} output tok/s (succeeded)",
        f"  tokens/request  {s.mean_output_tokens:.1f} output, {prompt} prompt",
        f"  {'latency (ms)':<14}{'mean':>9}{'p50':>9}{'p90':>9}{'p99':>9}",
    ]
    rows = [("TTFT", s.ttft), ("TPOT", s.tpot), ("E2E", s.e2e)]
    if s.send_lag is not None:
        rows.append(("send lag", s.send_lag))  # due time to sending: the client's own queue
    if s.health is not None or s.health_errors:
        rows.append(("/health", s.health))
    for name, dist in rows:
        lines.append(f"  {name:<14}" + "".join(f"{v:>9}" for v in _ms(dist)))
    if s.health_errors:
        lines.append(f"  /health failures {s.health_errors}")
    errors = ", ".join(f"{k}: {v}" for k, v in s.errors.items()) or "none"
    lines.append(f"  errors          {errors}")
    if s.warmup_errors:
        lines.append("  warm-up errors  " + ", ".join(f"{k}: {v}" for k, v in s.warmup_errors.items()))
    if s.tokens_estimated:
        lines.append(f"  note            {s.tokens_estimated} responses had no usage chunk: their tokens "
                     "were counted as content chunks (an undercount when a chunk holds several)")
    return "\n".join(lines)


def write_json(path: Path, data: Any) -> None:
    """Write `data` as indented JSON, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def make_progress(total: int, label: str, enabled: bool = True) -> tuple[Callable[[RequestResult], None], Callable[[], None]]:
    """`(update, close)`: `update(result)` after each request, `close()` at the end. Uses
    tqdm when it is installed, else one rewritten stderr line (at most 4 updates a second);
    both no-ops when not `enabled`."""
    if not enabled:
        return (lambda r: None), (lambda: None)
    try:
        from tqdm import tqdm
    except ImportError:
        return _line_progress(total, label)
    bar = tqdm(total=total, desc=label, unit="req", leave=False, file=sys.stderr)
    errors = 0

    def update(result: RequestResult) -> None:
        nonlocal errors
        errors += not result.ok
        bar.update(1)
        if errors:
            bar.set_postfix(errors=errors, refresh=False)

    return update, bar.close


def _line_progress(total: int, label: str):
    done = errors = 0
    last = 0.0

    def update(result: RequestResult) -> None:
        nonlocal done, errors, last
        done += 1
        errors += not result.ok
        now = time.monotonic()
        if now - last >= 0.25 or done == total:
            last = now
            sys.stderr.write(f"\r{label}: {done}/{total} requests, {errors} errors")
            sys.stderr.flush()

    def close() -> None:
        sys.stderr.write("\n")

    return update, close
