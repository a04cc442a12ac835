"""Latency distributions as a PNG (needs matplotlib: the `bench` extra).

Each panel shows the empirical cumulative distribution (share of requests at or below a
latency) of one figure, one line per series, so p50/p90/p99 can be read off the y axis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from clients.stats import RequestResult

#: The panels of each row: title and the per-request figure it plots.
FIGURES = (
    ("time to first token", lambda r: r.ttft),
    ("time per output token", lambda r: r.tpot),
    ("end-to-end latency", lambda r: r.e2e),
)


class PlotUnavailableError(RuntimeError):
    """matplotlib is not installed (it comes with the project's `test` extra)."""


def plot_latencies(rows: Mapping[str, Mapping[str, Sequence[RequestResult]]], path: Path, title: str = "") -> Path:
    """Draw one row of panels (TTFT, TPOT, E2E) per entry of `rows`; each row maps a series
    label (e.g. a server name) to its results (failed requests are left out). Writes `path`
    and returns it. Raises PlotUnavailableError without matplotlib, ValueError for no rows."""
    if not rows:
        raise ValueError("nothing to plot")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailableError("plotting needs matplotlib: pip install 'qwen-vl-serve[test]'") from exc
    fig, axes = plt.subplots(len(rows), len(FIGURES), figsize=(5 * len(FIGURES), 3.2 * len(rows)), squeeze=False)
    for r, (row_label, series) in enumerate(rows.items()):
        for c, (name, figure) in enumerate(FIGURES):
            ax = axes[r][c]
            for label, results in series.items():
                values = sorted(v * 1000 for v in (figure(x) for x in results if x.ok) if v is not None)
                if values:
                    ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=label)
            ax.set_title(f"{row_label}: {name}" if row_label else name, fontsize=9)
            ax.set_xlabel("ms")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            if c == 0:
                ax.set_ylabel("share of requests")
            if r == 0 and c == len(FIGURES) - 1:
                ax.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
