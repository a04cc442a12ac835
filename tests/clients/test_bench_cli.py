"""`qwen-vl-bench`: argument handling, output formats, and short real runs against the
real qwen-vl-serve app on a scripted engine (no model)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from clients.bench import BenchOptions, build_parser, main, options_from_args, run_bench
from clients.loadgen import LoadPlan
from clients.report import format_summary
from clients.stats import RequestResult, summarize
from clients.workload import WorkloadSpec

from bench_scripted_server import scripted_server


def parse(*argv: str) -> BenchOptions:
    return options_from_args(build_parser().parse_args(list(argv)))


def test_defaults():
    o = parse()
    assert o.plan.concurrency == 8 and o.plan.rate is None and o.plan.num_requests == 100
    assert o.workload.images == "data" and (o.workload.image_width, o.workload.image_height) == (448, 448)
    assert o.workload.fixed_output and o.workload.max_tokens == 16
    assert o.health_interval == 0.05 and o.warmup == 4


def test_rate_without_concurrency_is_uncapped():
    o = parse("--rate", "5")
    assert o.plan.rate == 5.0 and o.plan.concurrency is None


def test_workload_flags():
    o = parse("--images", "http", "--image-size", "224x160", "--image-format", "png", "--repeat-share", "0.75",
              "--image-pool", "3", "--prompt-words", "5", "--max-tokens", "9", "--no-fixed-output",
              "--images-per-request", "2", "--health-interval", "0", "--concurrency", "3", "--duration", "10")
    w = o.workload
    assert (w.images, w.image_width, w.image_height, w.image_format) == ("http", 224, 160, "PNG")
    assert (w.repeat_share, w.pool_size, w.prompt_words, w.max_tokens) == (0.75, 3, 5, 9)
    assert not w.fixed_output and w.images_per_request == 2
    assert o.health_interval is None and o.plan.concurrency == 3 and o.plan.duration == 10.0


@pytest.mark.parametrize("argv", [["--image-size", "big"], ["--image-size", "0x10"], ["--images", "ftp"]])
def test_bad_arguments_exit_with_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


@pytest.mark.parametrize("argv", [["--repeat-share", "2"], ["--num-requests", "0"], ["--timeout", "0"],
                                  ["--rate", "nan"], ["--timeout", "nan"], ["--duration", "inf"], ["--seed", "-1"],
                                  ["--base-url", "127.0.0.1:8000"], ["--base-url", "http://127.0.0.1:99999"],
                                  ["--base-url", "ftp://127.0.0.1"], ["--json", "/proc/no-such-dir/x.json"],
                                  ["--constant-rate"]])
def test_inconsistent_values_exit_with_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_unreachable_server_is_reported(capsys):
    assert main(["--base-url", "http://127.0.0.1:9", "--num-requests", "1", "--no-progress"]) == 1
    assert "could not list models" in capsys.readouterr().err


def test_table_lists_every_figure():
    s = summarize([RequestResult(0.0, 1.0, 0.2, 0.8, 4, 30), RequestResult(0.0, 0.1, error="http_429")],
                  1.0, health=[0.002])
    table = format_summary(s, "title")
    for word in ("title", "req/s", "output tok/s", "TTFT", "TPOT", "E2E", "/health", "http_429: 1"):
        assert word in table


# --- live: the real app on a scripted engine ------------------------------------------------


@pytest.fixture(scope="module")
def server():
    with scripted_server(delay=0.002, image_allow_networks=["127.0.0.2/32"]) as (base, engine):
        yield base, engine


@pytest.mark.parametrize("images", ["data", "http", "none"])
def test_live_run(server, images):
    base, engine = server
    before = len(engine.history)
    opts = BenchOptions(
        base_url=base,
        workload=WorkloadSpec(model="", images=images, image_width=64, image_height=64, max_tokens=5,
                              repeat_share=0.5, pool_size=2),
        plan=LoadPlan(num_requests=12, concurrency=4),
        warmup=2,
        health_interval=0.02,
        progress=False,
    )
    run = asyncio.run(run_bench(opts))
    s = run.summary
    assert (s.requests, s.succeeded, s.errors) == (12, 12, {})
    assert s.mean_output_tokens == 5  # usage from the server: exactly max_tokens
    assert s.ttft.p50 > 0 and s.tpot.p50 > 0 and s.e2e.p99 >= s.e2e.p50
    assert s.requests_per_s > 0 and s.output_tokens_per_s == pytest.approx(5 * s.requests_per_s)
    assert s.health is not None and s.health.count >= 1
    sent = engine.history[before:]
    assert len(sent) == 14  # warmup included
    assert all(r.sampling.ignore_eos and r.sampling.min_tokens == 5 for r in sent)
    assert {len(r.images) for r in sent} == ({0} if images == "none" else {1})


def test_live_run_counts_refusals(server):
    """An unknown model name: every request fails with a 404, counted by kind."""
    base, _ = server
    opts = BenchOptions(base_url=base, workload=WorkloadSpec(model="nope", images="none"),
                        plan=LoadPlan(num_requests=5, concurrency=2), warmup=0, health_interval=None,
                        progress=False)
    s = asyncio.run(run_bench(opts)).summary
    assert s.succeeded == 0 and s.errors == {"http_404": 5}


def test_a_warm_up_request_that_times_out_is_a_timeout_and_the_warm_up_ends_with_it():
    """A server that accepts and never answers: the warm-up costs one --timeout (and a
    second), its requests count as `timeout` (they were cut off as `cancelled` just before)."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    held = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])  # read nothing, answer nothing
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        opts = BenchOptions(base_url=f"http://127.0.0.1:{listener.getsockname()[1]}",
                            workload=WorkloadSpec(model="m", images="none"),
                            plan=LoadPlan(num_requests=2, concurrency=2, duration=0.5, grace=0.0),
                            warmup=2, timeout=1.5, health_interval=None, progress=False)
        started = time.monotonic()
        s = asyncio.run(run_bench(opts)).summary
        took = time.monotonic() - started
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()
    assert s.warmup_errors == {"timeout": 2}
    assert took < 1.5 + 1.0 + 0.5 + 2.0  # warm-up bound, then the measured run's duration, and slack


def test_cli_writes_json_and_plot(server, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    base, _ = server
    code = main(["--base-url", base, "--num-requests", "6", "--concurrency", "2", "--images", "none",
                 "--max-tokens", "3", "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png"),
                 "--no-progress", "--save-requests", "--label", "live"])
    assert code == 0
    assert "live" in capsys.readouterr().out
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["summary"]["succeeded"] == 6 and len(data["requests"]) == 6
    assert data["options"]["workload"]["model"] == "scripted"  # the one /v1/models listed
    assert data["units"]["times"].startswith("seconds") and data["interrupted"] is False
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_json_to_stdout(server, capsys):
    base, _ = server
    assert main(["--base-url", base, "--num-requests", "2", "--images", "none", "--json", "-",
                 "--no-progress", "--health-interval", "0"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["summary"]["requests"] == 2
    assert "TTFT" in out.err


def test_help_states_the_defaults(capsys):
    from server.tiny_model import main as tiny_main

    text = " ".join(build_parser().format_help().split())
    for shown in ("--image-size WxH (default: 448x448)", "output tokens per request (default: 16)",
                  "(default: 0.0)", "--seed SEED seed of pictures, prompts and arrivals (default: 0)"):
        assert shown in text, shown
    assert "default: None" not in text and "default: False" not in text
    assert "--no-progress (default" not in text  # a flag that turns something off has no "default: True"
    with pytest.raises(SystemExit):
        tiny_main(["--help"])
    assert "(default: qwen2-vl)" in " ".join(capsys.readouterr().out.split())


def test_a_run_that_cannot_start_leaves_no_empty_output_files(tmp_path):
    out = tmp_path / "new" / "r.json"
    assert main(["--base-url", "http://127.0.0.1:9", "--num-requests", "1", "--no-progress",
                 "--json", str(out), "--plot", str(tmp_path / "p.png")]) == 1
    assert not out.exists() and not (tmp_path / "p.png").exists()


def test_a_signal_while_pictures_are_encoded_ends_the_bench_at_once(slow_server):
    import signal
    import time

    proc = _bench_process(slow_server, "--num-requests", "20000", "--images", "data", "--image-size", "448x448")
    time.sleep(4.0)  # encoding 20,000 pictures takes minutes
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - began < 10
    assert proc.returncode == 130, (out, err)
    assert "interrupted before any measured request" in err and "Traceback" not in err


def test_the_json_keeps_no_api_key(server, tmp_path):
    base, _ = server
    assert main(["--base-url", base, "--num-requests", "2", "--images", "none", "--api-key", "sk-SECRET-123",
                 "--json", str(tmp_path / "r.json"), "--no-progress", "--health-interval", "0"]) == 0
    text = (tmp_path / "r.json").read_text()
    assert "sk-SECRET" not in text and json.loads(text)["options"]["api_key"] == "(set)"


def test_failed_requests_make_the_exit_status_1(tmp_path, capsys):
    """One slot and no queue against 4 streams: some requests get a 429, and the run says so
    in its exit status as well as in its table."""
    with scripted_server(delay=0.01, max_concurrent_requests=1, max_queued_requests=0) as (base, _):
        code = main(["--base-url", base, "--num-requests", "12", "--concurrency", "4", "--images", "none",
                     "--max-tokens", "8", "--warmup", "0", "--no-progress", "--health-interval", "0"])
    out = capsys.readouterr().out
    assert code == 1 and "http_429" in out and "succeeded" in out


def _bench_process(base: str, *extra: str):
    import subprocess
    import sys
    from pathlib import Path

    return subprocess.Popen(
        [sys.executable, "-m", "clients.bench", "--base-url", base, "--images", "http", "--image-size", "32x32",
         "--num-requests", "400", "--concurrency", "2", "--max-tokens", "200", "--warmup", "0",
         "--no-progress", "--health-interval", "0.05", *extra],
        cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _children_once_running(proc, count: int) -> list:
    import time

    import psutil

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        kids = psutil.Process(proc.pid).children(recursive=True)
        if len(kids) >= count:
            return kids
        time.sleep(0.2)
    raise AssertionError("the bench did not start its image server and probe")


@pytest.fixture(scope="module")
def slow_server():
    """Each answer takes seconds: a run is always mid-flight when it is signalled."""
    with scripted_server(delay=0.03, image_allow_networks=["127.0.0.2/32"]) as (base, engine):
        yield base


def test_sigint_ends_the_run_with_its_figures_and_stops_the_children(slow_server):
    import signal
    import time

    import psutil

    proc = _bench_process(slow_server)
    # the image server, the /health probe and multiprocessing's resource tracker
    kids = _children_once_running(proc, 2)
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "interrupted" in out and "sent" in out and "cancelled: 2" in out
    assert "Traceback" not in err
    _, alive = psutil.wait_procs(kids, timeout=10)
    assert not alive


def test_children_end_when_the_bench_is_killed(slow_server):
    import signal
    import time

    import psutil

    proc = _bench_process(slow_server)
    kids = _children_once_running(proc, 2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    _, alive = psutil.wait_procs(kids, timeout=10)
    assert not alive, [k.cmdline() for k in alive]


def test_table_shows_the_clients_own_queue_the_unsent_requests_and_estimated_tokens():
    results = [RequestResult(0.0, 1.0, 0.2, 0.8, 4, 30, send_lag=0.5, tokens_from_usage=False),
               RequestResult(0.0, 1.0, 0.2, 0.8, 4, 30, send_lag=1.5)]
    s = summarize(results, 1.0, unsent=7, warmup=[RequestResult(0.0, 4.0, error="timeout")])
    assert s.tokens_estimated == 1 and s.send_lag.max == 1.5 and s.warmup_errors == {"timeout": 1}
    table = format_summary(s, "t")
    assert "7 more were due but never sent" in table and "send lag" in table and "1000.0" in table  # its mean
    assert "warm-up errors  timeout: 1" in table and "1 responses had no usage chunk" in table
    assert "(succeeded)" in table
    plain = format_summary(summarize(results[1:2], 1.0), "t")
    assert "more were due" not in plain and "no usage chunk" not in plain and "warm-up" not in plain
