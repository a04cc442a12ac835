"""The figures of a side-by-side run: per-cell measurements, the ours/theirs table (text
and Markdown) and the issue's targets, checked. Pure functions of the measurements."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from clients.stats import RequestResult, Summary

OURS, THEIRS = "qwen-vl-serve", "vllm"
#: Other processes using more than this many cores during a measurement mark it disturbed.
DISTURBED_CORES = 0.25


@dataclass
class Measurement:
    """One server's run of one cell: its summary, the CPU milliseconds its front-end
    process and its engine processes spent per successful request (warm-up and set-up
    included, so a little above the steady state), and the cores that processes outside
    this benchmark used meanwhile."""

    server: str
    summary: Summary
    other_cores: float
    api_cpu_ms: float | None = None
    engine_cpu_ms: float | None = None
    results: list[RequestResult] = field(default_factory=list, repr=False)


@dataclass
class Cell:
    workload: str
    concurrency: int
    runs: dict[str, Measurement] = field(default_factory=dict)

    @property
    def disturbed(self) -> bool:
        return any(m.other_cores > DISTURBED_CORES for m in self.runs.values())


# --- figures and ratios -------------------------------------------------------------------

@dataclass(frozen=True)
class Figure:
    """A column of the comparison: `get` reads it from a measurement; `unit` is "/s"
    (printed as is), "ms" (seconds printed as milliseconds) or "cpu-ms" (already ms)."""

    name: str
    get: Callable[[Measurement], float | None]
    unit: str

    def format(self, value: float | None) -> str:
        if value is None:
            return "-"
        return f"{value * 1000:.1f}" if self.unit == "ms" else f"{value:.2f}" if self.unit == "/s" else f"{value:.1f}"


FIGURES: tuple[Figure, ...] = (
    Figure("req/s", lambda m: m.summary.requests_per_s, "/s"),
    Figure("out tok/s", lambda m: m.summary.output_tokens_per_s, "/s"),
    Figure("TTFT p50", lambda m: m.summary.ttft and m.summary.ttft.p50, "ms"),
    Figure("TTFT p99", lambda m: m.summary.ttft and m.summary.ttft.p99, "ms"),
    Figure("TPOT p50", lambda m: m.summary.tpot and m.summary.tpot.p50, "ms"),
    Figure("E2E p50", lambda m: m.summary.e2e and m.summary.e2e.p50, "ms"),
    Figure("E2E p99", lambda m: m.summary.e2e and m.summary.e2e.p99, "ms"),
    Figure("/health p99", lambda m: m.summary.health and m.summary.health.p99, "ms"),
    Figure("API CPU/req", lambda m: m.api_cpu_ms, "cpu-ms"),
    Figure("engine CPU/req", lambda m: m.engine_cpu_ms, "cpu-ms"),
)


def ratio(ours: float | None, theirs: float | None) -> float | None:
    """ours / theirs, or None when either is missing or theirs is zero."""
    if ours is None or theirs is None or theirs == 0:
        return None
    return ours / theirs


def format_ms(seconds: float | None) -> str:
    """Seconds as milliseconds with one decimal; "-" for None."""
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def cell_rows(cell: Cell) -> list[list[str]]:
    """Rows (ours, theirs, ratio) of one cell: workload, concurrency, server, figures,
    errors, other cores."""
    rows = []
    for server in (OURS, THEIRS):
        m = cell.runs.get(server)
        if m is None:
            continue
        errors = sum(m.summary.errors.values())
        rows.append([cell.workload, str(cell.concurrency), server, *(f.format(f.get(m)) for f in FIGURES),
                     str(errors), f"{m.other_cores:.2f}"])
    if OURS in cell.runs and THEIRS in cell.runs:
        o, t = cell.runs[OURS], cell.runs[THEIRS]
        ratios = [ratio(f.get(o), f.get(t)) for f in FIGURES]
        rows.append([cell.workload, str(cell.concurrency), "ratio",
                     *("-" if r is None else f"{r:.2f}" for r in ratios), "", ""])
    return rows


HEADER = ["wl", "conc", "server", *(f.name + ("" if f.unit == "/s" else " ms") for f in FIGURES), "errors", "other cores"]


def format_text(cells: list[Cell]) -> str:
    rows = [HEADER] + [r for c in cells for r in cell_rows(c)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows)


def format_markdown(cells: list[Cell]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for c in cells:
        for r in cell_rows(c):
            if r[2] == "ratio":
                r = [*r[:2], "**ours/theirs**", *(f"**{v}**" if v not in ("", "-") else v for v in r[3:])]
            lines.append("| " + " | ".join(r) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class TargetCheck:
    target: str
    met: bool | None  # None: not measured
    detail: str


def check_targets(cells: list[Cell]) -> list[TargetCheck]:
    """The issue's targets: throughput >= theirs on a, c, d; >= 1.5x on b; median TTFT
    no worse than theirs; /health p99 < 50 ms at the highest concurrency measured."""
    checks = []
    paired = [c for c in cells if OURS in c.runs and THEIRS in c.runs]

    def both(c: Cell, get: Callable[[Summary], float | None]) -> float | None:
        return ratio(get(c.runs[OURS].summary), get(c.runs[THEIRS].summary))

    for wl, need in (("a", 1.0), ("b", 1.5), ("c", 1.0), ("d", 1.0)):
        rs = [(c.concurrency, both(c, lambda s: s.requests_per_s)) for c in paired if c.workload == wl]
        rs = [(k, r) for k, r in rs if r is not None]
        checks.append(TargetCheck(
            f"({wl}) throughput >= {need:g}x theirs",
            all(r >= need for _, r in rs) if rs else None,
            ", ".join(f"c={k}: {r:.2f}x" for k, r in rs) or "not measured",
        ))
    ttft = [(c.workload, c.concurrency, both(c, lambda s: s.ttft and s.ttft.p50)) for c in paired]
    ttft = [t for t in ttft if t[2] is not None]
    checks.append(TargetCheck(
        "median TTFT <= theirs",
        all(r <= 1.0 for _, _, r in ttft) if ttft else None,
        ", ".join(f"{w}/c={k}: {r:.2f}x" for w, k, r in ttft) or "not measured",
    ))
    top = max((c.concurrency for c in cells), default=None)
    health = [(c.workload, c.runs[OURS].summary.health) for c in cells if c.concurrency == top and OURS in c.runs]
    health = [(w, h.p99) for w, h in health if h is not None]
    checks.append(TargetCheck(
        f"/health p99 < 50 ms at c={top}",
        all(p < 0.05 for _, p in health) if health else None,
        ", ".join(f"{w}: {p * 1000:.1f} ms" for w, p in health) or "not measured",
    ))
    return checks


def format_targets(checks: list[TargetCheck]) -> str:
    mark = {True: "met", False: "MISSED", None: "n/a"}
    return "\n".join(f"- {c.target}: **{mark[c.met]}** ({c.detail})" for c in checks)
