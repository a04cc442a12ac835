"""`qwen-vl-bench`: load an OpenAI-compatible chat-completions server and report
requests/s, output tokens/s, TTFT, TPOT and end-to-end latency (p50/p90/p99), errors by
kind and, during the run, /health latency.

    qwen-vl-bench --base-url http://127.0.0.1:8000 --concurrency 16 --num-requests 200 \
        --images data --image-size 448x448 --max-tokens 16 --json out.json --plot out.png
    qwen-vl-bench compare --model DIR ...     (side by side with vLLM's server; see
                                               `clients.compare`)

Requests stream (`stream_options.include_usage`), and by default fix their output length
(`ignore_eos` with `min_tokens = max_tokens`), so every server generates the same tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import sys
import threading
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from clients.image_server import DEFAULT_HOST, ImageServer, free_port
from clients.loadgen import DEFAULT_GRACE, LoadOutcome, LoadPlan, run_load
from clients.probe import DEFAULT_INTERVAL, HealthProbe
from clients.report import format_summary, make_progress, write_json
from clients.sse import open_session, stream_chat
from clients.stats import RequestResult, Summary, summarize
from clients.workload import IMAGE_MODES, WorkloadSpec, build_workload
from server.help_format import DefaultsHelpFormatter

#: Per-request client timeout in seconds.
DEFAULT_TIMEOUT = 120.0
#: Seconds to connect to the API server.
CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class BenchOptions:
    """One benchmark run. `workload.model` may be empty: the server's first model is used.
    `warmup` requests (not measured, at up to the plan's concurrency) go first."""

    base_url: str
    workload: WorkloadSpec
    plan: LoadPlan
    warmup: int = 4
    timeout: float = DEFAULT_TIMEOUT
    image_host: str = DEFAULT_HOST
    health_interval: float | None = DEFAULT_INTERVAL  # None: no /health probe
    api_key: str | None = None
    progress: bool = True
    label: str = "qwen-vl-bench"


@dataclass
class BenchRun:
    options: BenchOptions
    summary: Summary
    results: list[RequestResult] = field(default_factory=list)
    #: the /health probe's latencies (seconds) and failed probes, behind `summary.health`
    health: list[float] = field(default_factory=list)
    health_errors: int = 0

    interrupted: bool = False  # stopped early (SIGINT or SIGTERM): the figures cover what ran

    def to_dict(self, with_requests: bool = False) -> dict:
        options = asdict(self.options)
        if options["api_key"]:
            options["api_key"] = "(set)"  # the file may be shared; the key must not be
        data = {"label": self.options.label, "units": UNITS, "interrupted": self.interrupted,
                "options": options, "summary": self.summary.to_dict()}
        if with_requests:
            data["requests"] = [asdict(r) for r in self.results]
        return data


#: The units of the JSON output's figures.
UNITS = {"times": "seconds (time.perf_counter() for a request's timestamps)",
         "requests_per_s": "successful requests per second of the summary's duration",
         "output_tokens_per_s": "output tokens of successful requests per second of the duration"}


class BenchError(RuntimeError):
    """The run could not start (server unreachable, no model listed, ...)."""


async def resolve_model(session: aiohttp.ClientSession, base_url: str, headers: dict[str, str]) -> str:
    """The first model `/v1/models` lists. Raises BenchError when there is none."""
    try:
        async with session.get(f"{base_url}/v1/models", headers=headers, raise_for_status=True) as response:
            return (await response.json(content_type=None))["data"][0]["id"]
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise BenchError(f"could not list models at {base_url}/v1/models: {exc!r}") from exc


async def run_bench(opts: BenchOptions, stop: asyncio.Event | None = None) -> BenchRun:
    """Build the workload, warm up, run the plan while probing /health, summarize. Setting
    `stop` ends the run early, with the figures of what ran (`interrupted`). The run's
    options come back with the model that was used. Raises BenchError when the server
    cannot be asked for its model, RuntimeError when the image server or the probe cannot
    start. The probe and the image server are child processes started with `spawn`: a
    script calling this needs the `if __name__ == "__main__":` guard."""
    base = opts.base_url.rstrip("/")
    url = f"{base}/v1/chat/completions"
    headers = {"authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
    in_flight = opts.plan.concurrency
    async with open_session(in_flight, opts.timeout, min(CONNECT_TIMEOUT, opts.timeout)) as session:
        spec = opts.workload
        if not spec.model:
            spec = _with_model(spec, await resolve_model(session, base, headers))
        image_port = free_port(opts.image_host) if spec.images == "http" else None
        image_base = f"http://{opts.image_host}:{image_port}" if image_port else None
        count = opts.warmup + opts.plan.num_requests
        if opts.progress and spec.images != "none" and count * spec.images_per_request >= 200:
            print(f"{opts.label}: encoding the pictures of {count} requests before the run",
                  file=sys.stderr, flush=True)
        cancel = threading.Event()  # a signal must not wait for thousands of pictures
        watcher = asyncio.ensure_future(stop.wait()) if stop is not None else None
        if watcher is not None:
            watcher.add_done_callback(lambda _: cancel.set())
        try:
            built = await asyncio.to_thread(build_workload, spec, count, image_base, cancel)
        finally:
            if watcher is not None:
                watcher.cancel()
        if stop is not None and stop.is_set():
            return BenchRun(replace(opts, workload=spec), summarize([], 0.0), interrupted=True)
        expected = spec.max_tokens if spec.fixed_output else None

        def send(bodies: list[bytes]):
            return lambda i: stream_chat(session, url, bodies[i], headers, expected)

        probe = HealthProbe(f"{base}/health", opts.health_interval or DEFAULT_INTERVAL)
        warm_outcome = LoadOutcome()
        with ExitStack() as stack:
            if image_port:
                stack.enter_context(ImageServer(built.files, opts.image_host, image_port))
            if opts.warmup:
                # At most one request timeout in all, however the server behaves (and a second
                # more, so that a request that times out is counted as `timeout`, not cut off
                # as `cancelled` just before).
                warm = LoadPlan(num_requests=opts.warmup, concurrency=min(opts.warmup, in_flight or 4),
                                duration=opts.timeout, grace=1.0)
                warm_outcome = await run_load(send(built.bodies), warm, stop=stop)
            bodies = built.bodies[opts.warmup :]
            outcome = LoadOutcome(interrupted=True)
            if not warm_outcome.interrupted:
                update, close = make_progress(opts.plan.num_requests, opts.label, opts.progress)
                stack.callback(close)
                if opts.health_interval:
                    stack.enter_context(probe)
                outcome = await run_load(send(bodies), opts.plan, update, stop=stop)
    summary = summarize(outcome.results, outcome.duration, probe.result.latencies, probe.result.errors,
                        unsent=outcome.unsent, warmup=warm_outcome.results)
    return BenchRun(replace(opts, workload=spec), summary, outcome.results, list(probe.result.latencies),
                    probe.result.errors, interrupted=outcome.interrupted)


def _with_model(spec: WorkloadSpec, model: str) -> WorkloadSpec:
    return replace(spec, model=model)


# --- command line -------------------------------------------------------------------------


def parse_image_size(text: str) -> tuple[int, int]:
    """`WxH` (or `N` for a square) as (width, height); argparse's error otherwise."""
    try:
        w, _, h = text.lower().partition("x")
        size = (int(w), int(h or w))
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size {text!r} is not WIDTHxHEIGHT") from None
    if min(size) < 1:
        raise argparse.ArgumentTypeError("image size must be positive")
    return size


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qwen-vl-bench",
        formatter_class=DefaultsHelpFormatter,
        description="Load generator for OpenAI-compatible chat completions (streaming). "
        "`qwen-vl-bench compare --help`: side by side with vLLM's server.",
    )
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (without /v1)")
    p.add_argument("--model", default="", help="model name (default: the first /v1/models lists)")
    p.add_argument("--api-key", default=None, help="sent as a Bearer token")
    load = p.add_argument_group("load")
    load.add_argument("--concurrency", type=int, default=None, help="requests in flight (default 8 without --rate)")
    load.add_argument("--rate", type=float, default=None, help="requests per second (Poisson arrivals); "
                      "with --concurrency, that caps requests in flight")
    load.add_argument("--constant-rate", action="store_true", help="equal gaps instead of Poisson arrivals")
    load.add_argument("--num-requests", type=int, default=100, help="measured requests")
    load.add_argument("--duration", type=float, default=None, help="stop issuing after this many seconds")
    load.add_argument("--warmup", type=int, default=4, help="unmeasured requests sent first")
    load.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="per-request timeout, seconds")
    load.add_argument("--grace", type=float, default=DEFAULT_GRACE,
                      help="seconds in-flight requests may finish after --duration")
    work = p.add_argument_group("workload")
    work.add_argument("--images", choices=IMAGE_MODES, default="data",
                      help="none: text only; data: base64 data URLs; http: URLs on a local image server")
    work.add_argument("--images-per-request", type=int, default=1)
    work.add_argument("--image-size", type=parse_image_size, default=(448, 448), metavar="WxH")
    work.add_argument("--image-format", choices=("jpeg", "png", "webp"), default="jpeg")
    work.add_argument("--repeat-share", type=float, default=0.0,
                      help="share of images drawn from a small pool (0: every image unique)")
    work.add_argument("--image-pool", type=int, default=4, help="pictures in the pool of repeated images")
    work.add_argument("--image-host", default=DEFAULT_HOST, help="loopback address of the image server")
    work.add_argument("--prompt-words", type=int, default=32, help="words of text per prompt (~tokens)")
    work.add_argument("--max-tokens", type=int, default=16, help="output tokens per request")
    work.add_argument("--no-fixed-output", dest="fixed_output", action="store_false",
                      help="let requests stop at EOS (default: ignore_eos and min_tokens=max_tokens)")
    work.add_argument("--temperature", type=float, default=0.0,
                      help="sampling temperature (0: greedy; 1 for random-weight full-size checkpoints)")
    work.add_argument("--seed", type=int, default=0, help="seed of pictures, prompts and arrivals")
    out = p.add_argument_group("output")
    out.add_argument("--json", type=Path, default=None, help="write the summary as JSON here ('-': stdout)")
    out.add_argument("--save-requests", action="store_true", help="include every request in the JSON")
    out.add_argument("--plot", type=Path, default=None, help="write latency distributions to this PNG")
    out.add_argument("--label", default="qwen-vl-bench", help="title of the report")
    out.add_argument("--no-progress", dest="progress", action="store_false")
    out.add_argument("--health-interval", type=float, default=DEFAULT_INTERVAL,
                     help="seconds between /health probes during the run (0: none)")
    return p


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """BenchOptions from parsed arguments. Raises ValueError for inconsistent values."""
    concurrency = args.concurrency if args.concurrency is not None or args.rate is not None else 8
    width, height = args.image_size
    workload = WorkloadSpec(
        model=args.model,
        images=args.images,
        images_per_request=args.images_per_request,
        image_width=width,
        image_height=height,
        image_format=args.image_format.upper(),
        repeat_share=args.repeat_share,
        pool_size=args.image_pool,
        prompt_words=args.prompt_words,
        max_tokens=args.max_tokens,
        fixed_output=args.fixed_output,
        temperature=args.temperature,
        seed=args.seed,
    )
    plan = LoadPlan(
        num_requests=args.num_requests,
        concurrency=concurrency,
        rate=args.rate,
        constant_rate=args.constant_rate,
        duration=args.duration,
        grace=args.grace,
        seed=args.seed,
    )
    if args.warmup < 0 or not (0 < args.timeout < math.inf) or not (0 <= args.health_interval < math.inf):
        raise ValueError("warmup, timeout and health interval must be numbers, not negative")
    if args.seed < 0:
        raise ValueError("seed must not be negative")
    if args.constant_rate and args.rate is None:
        raise ValueError("--constant-rate spaces the requests of a --rate; give one")
    _check_base_url(args.base_url)
    return BenchOptions(
        base_url=args.base_url,
        workload=workload,
        plan=plan,
        warmup=args.warmup,
        timeout=args.timeout,
        image_host=args.image_host,
        health_interval=args.health_interval or None,
        api_key=args.api_key,
        progress=args.progress,
        label=args.label,
    )


def _check_base_url(url: str) -> None:
    """Raises ValueError unless `url` is an http(s) URL with a host (and a valid port)."""
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 (raises ValueError for a port out of range)
    except ValueError:
        raise ValueError(f"--base-url {url!r} has an invalid port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--base-url {url!r} is not an http:// or https:// URL")


def _check_writable(parser: argparse.ArgumentParser, path: Path | None, what: str) -> None:
    """Fail before the run, not after it, when an output file cannot be written."""
    if path is None or str(path) == "-":
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = path.exists()
        with open(path, "a"):
            pass
        if not existed:  # no empty file left behind should the run fail
            path.unlink()
    except OSError as exc:
        parser.error(f"{what} {path}: {exc.strerror or exc}")


async def _run_until_signalled(opts: BenchOptions) -> BenchRun:
    """`run_bench`, ended early with the figures so far on the first SIGINT or SIGTERM;
    a second one cancels at once."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    task = asyncio.current_task()

    def on_signal() -> None:
        if stop.is_set():
            task.cancel()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        return await run_bench(opts, stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 when every measured request succeeded (requests cancelled at the
    end of `--duration` + `--grace` aside), 1 otherwise or when the run could not start,
    2 for bad arguments, 130 when interrupted before any measured request."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        from clients.compare import main as compare_main

        return compare_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        opts = options_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    _check_writable(parser, args.json, "--json")
    _check_writable(parser, args.plot, "--plot")
    try:
        run = asyncio.run(_run_until_signalled(opts))
    except (BenchError, RuntimeError, OSError) as exc:  # unreachable server, image server not started
        print(f"qwen-vl-bench: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("qwen-vl-bench: interrupted", file=sys.stderr)
        return 130
    if run.interrupted and not run.summary.requests:
        print("qwen-vl-bench: interrupted before any measured request", file=sys.stderr)
        return 130
    to_stdout = args.json is not None and str(args.json) == "-"
    title = opts.label + (" (interrupted: the figures cover what ran)" if run.interrupted else "")
    print(format_summary(run.summary, title), file=sys.stderr if to_stdout else sys.stdout)
    if args.json is not None:
        data = run.to_dict(with_requests=args.save_requests)
        if to_stdout:
            print(json.dumps(data, indent=2))
        else:
            write_json(args.json, data)
    if args.plot is not None:
        from clients.plot import PlotUnavailableError, plot_latencies

        try:
            plot_latencies({"": {opts.label: run.results}}, args.plot, opts.label)
        except PlotUnavailableError as exc:
            print(f"qwen-vl-bench: {exc}", file=sys.stderr)
            return 1
    failed = sum(n for kind, n in run.summary.errors.items() if kind != "cancelled")
    return 0 if run.summary.succeeded and not failed and not run.interrupted else 1


if __name__ == "__main__":
    raise SystemExit(main())
