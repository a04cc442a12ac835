"""The side-by-side script's pure parts: ratios, target checks, tables, arguments,
server commands. (The full run needs two real engines: see docs/benchmarks.md.)"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from clients.compare import build_parser, config_from_args, engine_flags
from clients.compare_report import (
    OURS,
    THEIRS,
    Cell,
    Measurement,
    check_targets,
    format_markdown,
    format_text,
    ratio,
)
from clients.servers import ours_spec, vllm_spec
from clients.stats import RequestResult, summarize


def summary(req_per_s: float, ttft: float, health: float | None = None):
    """A summary over 1 s with `req_per_s` requests of the given TTFT."""
    n = int(req_per_s)
    results = [RequestResult(0.0, 0.9, ttft, 0.8, output_tokens=16) for _ in range(n)]
    return summarize(results, 1.0, health=[health] if health is not None else [])


def cell(wl: str, conc: int, ours: tuple, theirs: tuple, other: float = 0.0) -> Cell:
    c = Cell(wl, conc)
    c.runs[OURS] = Measurement(OURS, summary(*ours), other, api_cpu_ms=12.0, engine_cpu_ms=30.0)
    c.runs[THEIRS] = Measurement(THEIRS, summary(*theirs), 0.0, api_cpu_ms=24.0, engine_cpu_ms=30.0)
    return c


def test_ratio():
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None and ratio(1.0, None) is None and ratio(1.0, 0.0) is None


def test_targets_met():
    cells = [
        cell("a", 64, (10, 0.1, 0.01), (10, 0.1)),
        cell("b", 64, (15, 0.1, 0.02), (10, 0.2)),
        cell("c", 64, (11, 0.1, 0.01), (10, 0.1)),
        cell("d", 64, (20, 0.05, 0.01), (19, 0.06)),
    ]
    checks = {c.target: c for c in check_targets(cells)}
    assert all(c.met for c in checks.values()), checks
    assert "c=64: 1.50x" in checks["(b) throughput >= 1.5x theirs"].detail


def test_targets_missed_and_unmeasured():
    cells = [
        cell("a", 1, (9, 0.1, 0.01), (10, 0.1)),       # slower
        cell("b", 1, (14, 0.1, 0.01), (10, 0.1)),      # 1.4x < 1.5x
        cell("d", 1, (10, 0.2, 0.08), (10, 0.1)),      # TTFT doubled, /health slow
    ]
    checks = {c.target: c.met for c in check_targets(cells)}
    assert checks["(a) throughput >= 1x theirs"] is False
    assert checks["(b) throughput >= 1.5x theirs"] is False
    assert checks["(c) throughput >= 1x theirs"] is None
    assert checks["(d) throughput >= 1x theirs"] is True
    assert checks["median TTFT <= theirs"] is False
    assert checks["/health p99 < 50 ms at c=1"] is False


def test_tables_show_both_servers_and_ratio():
    cells = [cell("b", 16, (15, 0.1, 0.004), (10, 0.2), other=0.5)]
    text = format_text(cells)
    assert OURS in text and THEIRS in text and "ratio" in text
    assert "1.50" in text and "0.50" in text  # throughput and TTFT ratios
    header, _, _, ratios = text.splitlines()
    assert "API CPU/req ms" in header and ratios.split()[-2:] == ["0.50", "1.00"]  # CPU ratios
    md = format_markdown(cells)
    assert md.count("\n") == 4 and "**ours/theirs**" in md and "**1.50**" in md
    assert cells[0].disturbed


def test_quick_config_and_subsets():
    args = build_parser().parse_args(["--quick", "--workloads", "b,d", "--concurrency", "1,8"])
    cfg = config_from_args(args)
    assert cfg.workloads == ("b", "d") and cfg.concurrencies == (1, 8)
    assert cfg.cell_duration < 40 and cfg.max_wall <= 900
    assert cfg.num_requests(1) == 30 and cfg.num_requests(8) >= 64


def test_workloads_without_unique_pictures_may_send_more_requests():
    from clients.compare import CHEAP_FACTOR, WORKLOADS

    assert [k for k, w in WORKLOADS.items() if w.unique_images] == ["a", "c"]
    cfg = config_from_args(build_parser().parse_args([]))
    assert cfg.num_requests(64, unique_images=False) == CHEAP_FACTOR * cfg.num_requests(64) > cfg.num_requests(64)


def test_image_size_reaches_every_workload_and_scales_unique_picture_caps():
    from clients.compare import WORKLOADS, cell_options
    from clients.servers import ManagedServer, ServerSpec

    default = config_from_args(build_parser().parse_args([]))
    assert default.image_size == (448, 448)
    cfg = config_from_args(build_parser().parse_args(["--image-size", "1920x1080"]))
    assert cfg.image_size == (1920, 1080)
    server = ManagedServer(ServerSpec("x", [], "127.0.0.1", 1), Path("unused.log"))
    for key in ("a", "b", "c"):
        spec = cell_options(server, WORKLOADS[key], 16, cfg, 0, 10, 5.0).workload
        assert (spec.image_width, spec.image_height) == (1920, 1080)
    # unique pictures of 10x the pixels: about a tenth of the requests, at least 8 a stream
    # and 16 in all
    assert cfg.num_requests(1) == 16 > 100 * 448 * 448 // (1920 * 1080)
    assert cfg.num_requests(64) == 8 * 64 < default.num_requests(64)
    larger = config_from_args(build_parser().parse_args(["--image-size", "600x500"]))
    assert larger.num_requests(16) == 600 * 448 * 448 // (600 * 500) == 401
    # repeated pictures are made once: their caps stay
    assert cfg.num_requests(64, unique_images=False) == default.num_requests(64, unique_images=False)
    # smaller pictures keep the caps
    small = config_from_args(build_parser().parse_args(["--image-size", "224"]))
    assert small.image_size == (224, 224) and small.num_requests(16) == default.num_requests(16)


def test_image_size_whose_request_bodies_would_not_fit_in_memory_is_refused():
    # (b) at 16 streams: 1,500 bodies a round of ~4.3 MB for a 4032x3024 phone photo
    with pytest.raises(ValueError, match=r"\(b\) at concurrency 16 would hold about .* GiB"):
        config_from_args(build_parser().parse_args(["--image-size", "4032x3024"]))
    # pictures by URL are not in the bodies; --quick's caps fit
    assert config_from_args(build_parser().parse_args(["--image-size", "4032x3024", "--workloads", "c,d"]))
    assert config_from_args(build_parser().parse_args(["--image-size", "4032x3024", "--quick"]))
    assert config_from_args(build_parser().parse_args(["--image-size", "1920x1080"]))


def test_bad_image_size_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--image-size", "0x10"])
    assert info.value.code == 2 and "image size must be positive" in capsys.readouterr().err


def test_full_matrix_is_bounded_under_30_minutes():
    cfg = config_from_args(build_parser().parse_args([]))
    cells = len(cfg.workloads) * len(cfg.concurrencies)
    assert cells == 12
    assert cfg.max_wall <= 1500  # 25 min, servers' start-up included


@pytest.mark.parametrize("argv", [
    ["--workloads", "a,x"], ["--concurrency", "1,0"], ["--concurrency", "one"], ["--rounds", "0"], ["--rounds", "10"],
    # values the run met only once both servers were up (or silently replaced by defaults)
    ["--cell-duration", "0"], ["--cell-duration", "-4"], ["--cell-duration", "nan"], ["--max-wall", "0"],
    ["--warmup-seconds", "-1"], ["--startup-timeout", "0"], ["--max-tokens", "0"], ["--prompt-words", "-2"],
    ["--temperature", "5"], ["--seed", "-1"], ["--gpu-memory-utilization", "3"], ["--max-num-seqs", "0"],
    ["--plot-concurrency", "8"],
])
def test_bad_matrix_arguments(argv):
    with pytest.raises(ValueError):
        config_from_args(build_parser().parse_args(argv))


def test_bad_matrix_arguments_exit_2_before_anything_starts(capsys):
    from clients.compare import main

    with pytest.raises(SystemExit) as info:
        main(["--seed", "-1"])
    assert info.value.code == 2
    assert "--seed must be 0 or more" in capsys.readouterr().err


def test_both_servers_get_the_same_engine_options():
    engine = engine_flags(2048, 64, 2048)
    ours = ours_spec("/m", "127.0.0.1", 1, engine, "127.0.0.2")
    theirs = vllm_spec("/m", "127.0.0.1", 2, engine, "127.0.0.2")
    assert ours.argv[1:3] == ["-m", "server.cli"]
    assert theirs.argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    for spec in (ours, theirs):
        joined = " ".join(spec.argv)
        assert " ".join(engine) in joined and "--model /m" in joined
    # each may fetch images from the image server's address only
    assert ours.argv[ours.argv.index("--image-allow-networks") + 1] == "127.0.0.2/32"
    assert theirs.argv[theirs.argv.index("--allowed-media-domains") + 1] == "127.0.0.2"
    assert ours.ready_path == "/ready"
    json.dumps(ours.argv)  # plain strings only


def test_warm_up_loads_each_server_with_pictures_no_cell_uses(tmp_path, monkeypatch):
    """A real run of the matrix against two live servers (the real app on scripted
    engines): the warm-up reaches both before the first cell, with other pictures."""
    import asyncio
    from contextlib import ExitStack

    from bench_scripted_server import MODEL, scripted_server

    import clients.compare
    from clients.compare import MatrixConfig, warm_up_then_measure
    from clients.servers import ManagedServer, ServerSpec

    monkeypatch.setattr(clients.compare, "SERVED_NAME", MODEL)
    cfg = MatrixConfig(workloads=("b", "d"), concurrencies=(1, 2), requests={1: 6, 2: 8},
                       cell_duration=60.0, max_wall=900.0, warmup_seconds=1.0, max_tokens=4, prompt_words=4)
    with ExitStack() as stack:
        engines, servers = {}, {}
        for name in (OURS, THEIRS):
            base, engines[name] = stack.enter_context(scripted_server(reply_tokens=8))
            host, port = base.removeprefix("http://").split(":")
            servers[name] = ManagedServer(ServerSpec(name, [], host, int(port)), tmp_path / f"{name}.log")
        warm_counts, lines = {}, []

        def log(msg: str) -> None:
            lines.append(msg)
            if msg.startswith("warm-up"):
                warm_counts[msg.split()[2].rstrip(":")] = {n: len(e.history) for n, e in engines.items()}

        cells = asyncio.run(warm_up_then_measure(servers, cfg, time.monotonic(), log))

    assert [(c.workload, c.concurrency) for c in cells] == [("b", 1), ("b", 2), ("d", 1), ("d", 2)]
    # each server was loaded before any cell ran: ours first, then theirs
    assert warm_counts[OURS][OURS] > 0 and warm_counts[OURS][THEIRS] == 0
    assert warm_counts[THEIRS][THEIRS] > 0 and warm_counts[THEIRS][OURS] == warm_counts[OURS][OURS]
    for name, engine in engines.items():
        warm = engine.history[: warm_counts[name][name]]
        measured = engine.history[warm_counts[name][name]:]
        warm_ids = {i for r in warm for i in r.image_ids}
        cell_ids = {i for r in measured for i in r.image_ids}
        assert warm_ids and cell_ids and not warm_ids & cell_ids
        assert all(c.runs[name].summary.succeeded == c.runs[name].summary.requests for c in cells)
    # both servers got the same pictures in the cells
    cell_pictures = {name: sorted(i for r in e.history[warm_counts[name][name]:] for i in r.image_ids)
                     for name, e in engines.items()}
    assert cell_pictures[OURS] == cell_pictures[THEIRS]
    # two rounds per cell, the server going first alternating: ABBA, then BAAB, ...
    runs = [line.split(":")[0] for line in lines if " round " in line]
    assert runs[:8] == [f"b/c=1/{OURS} round 1", f"b/c=1/{THEIRS} round 1", f"b/c=1/{THEIRS} round 2",
                        f"b/c=1/{OURS} round 2", f"b/c=2/{THEIRS} round 1", f"b/c=2/{OURS} round 1",
                        f"b/c=2/{OURS} round 2", f"b/c=2/{THEIRS} round 2"]
    # a cell's figures cover both rounds: (b) sends CHEAP_FACTOR x 6 requests at concurrency 1,
    # half of them a round
    assert cells[0].runs[OURS].summary.requests == cells[0].runs[THEIRS].summary.requests == 5 * 6


def test_warm_up_defaults_and_flag():
    assert config_from_args(build_parser().parse_args([])).warmup_seconds == 20.0
    assert config_from_args(build_parser().parse_args(["--quick"])).warmup_seconds == 8.0
    assert config_from_args(build_parser().parse_args(["--warmup-seconds", "0"])).warmup_seconds == 0.0


def test_the_stop_event_ends_the_matrix_mid_cell_and_leaves_that_cell_out(tmp_path, monkeypatch):
    """--max-wall is a hard bound: the cell running when it passes is cut short and left
    out, however slowly the servers answer."""
    import asyncio
    from contextlib import ExitStack

    from bench_scripted_server import MODEL, scripted_server

    import clients.compare
    from clients.compare import MatrixConfig, run_matrix
    from clients.servers import ManagedServer, ServerSpec

    monkeypatch.setattr(clients.compare, "SERVED_NAME", MODEL)
    cfg = MatrixConfig(workloads=("d",), concurrencies=(1,), requests={1: 50}, cell_duration=60.0,
                       max_wall=900.0, warmup_seconds=0.0, max_tokens=200, prompt_words=4)
    with ExitStack() as stack:
        servers = {}
        for name in (OURS, THEIRS):
            base, _ = stack.enter_context(scripted_server(delay=0.05))  # 10 s per request
            host, port = base.removeprefix("http://").split(":")
            servers[name] = ManagedServer(ServerSpec(name, [], host, int(port)), tmp_path / f"{name}.log")
        lines: list[str] = []

        async def main():
            stop = asyncio.Event()
            asyncio.get_running_loop().call_later(2.0, stop.set)
            return await run_matrix(servers, cfg, time.monotonic(), lines.append, stop)

        began = time.monotonic()
        cells = asyncio.run(main())
        took = time.monotonic() - began
    assert cells == [] and took < 10, took
    assert any("left out" in line for line in lines), lines


# A stand-in for both servers: answers 200 to every GET (readiness, /v1/models), writes its
# pid to a file named after its port.
STUB_SERVER = """
import http.server, os, pathlib, sys
pathlib.Path(sys.argv[3], sys.argv[2] + ".pid").write_text(str(os.getpid()))
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'{"object": "list", "data": [{"id": "tiny", "object": "model"}]}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Handler).serve_forever()
"""

# `qwen-vl-bench compare` with both servers replaced by the stand-in.
DRIVER = """
import sys
import clients.compare as compare
from clients.servers import ServerSpec
stub, pids = sys.argv[1], sys.argv[2]
def spec(name):
    def make(model, host, port, engine, image_host, extra=()):
        return ServerSpec(name, [sys.executable, stub, host, str(port), pids], host, port, ready_path="/")
    return make
compare.ours_spec, compare.vllm_spec = spec("qwen-vl-serve"), spec("vllm")
sys.exit(compare.main(sys.argv[3:]))
"""


def test_a_sigterm_ends_the_run_and_stops_both_servers(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    stub, driver, pids = tmp_path / "stub.py", tmp_path / "driver.py", tmp_path / "pids"
    stub.write_text(STUB_SERVER)
    driver.write_text(DRIVER)
    pids.mkdir()
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, str(driver), str(stub), str(pids), "--model", "/nonexistent",
                             "--out-dir", str(tmp_path / "out"), "--quick"],
                            cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 60
        for line in proc.stderr:
            lines.append(line)
            if "both servers ready" in line or time.monotonic() > deadline:
                break
        assert any("both servers ready" in line for line in lines), "".join(lines)
        servers = [int(p.read_text()) for p in pids.iterdir()]
        assert len(servers) == 2
        for pid in servers:
            os.kill(pid, 0)  # running
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 130
        assert "interrupted: both servers stopped" in proc.stderr.read()
        for pid in servers:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in pids.iterdir():
            try:
                os.kill(int(p.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
