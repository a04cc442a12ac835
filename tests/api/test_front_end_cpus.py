"""`_split_cores` in a child process of its own (it changes the CPU mask of the process that
calls it), against a real child process bound to one core, as vLLM binds a model worker, and
another standing in for the engine core."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, os, subprocess, sys, threading, time
from server.engine.vllm_engine import _split_cores

allowed = sorted(os.sched_getaffinity(0))
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
os.sched_setaffinity(worker.pid, {allowed[0]})       # a model worker, bound like vLLM binds it
core = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # engine core
before = threading.Thread(target=time.sleep, args=(5,), daemon=True)
before.start()
split = _split_cores({core.pid}, sys.argv[1])
seen = {}
after = threading.Thread(target=lambda: seen.update(after=sorted(os.sched_getaffinity(0))))
after.start(); after.join()
print(json.dumps({
    "allowed": allowed, "split": split,
    "main": sorted(os.sched_getaffinity(0)), "before": sorted(os.sched_getaffinity(before.native_id)),
    "after": seen["after"], "core": sorted(os.sched_getaffinity(core.pid)),
    "worker": sorted(os.sched_getaffinity(worker.pid)),
}))
worker.kill(); core.kill()
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to bind a worker to one")
@pytest.mark.parametrize("engine_core", ["any", "front-end", "workers"])
def test_front_end_moves_off_the_workers_cores(engine_core):
    out = subprocess.run([sys.executable, "-c", SCRIPT, engine_core], capture_output=True, text=True,
                         timeout=60, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    rest, worker = r["allowed"][1:], r["allowed"][:1]
    core = {"any": r["allowed"], "front-end": rest, "workers": worker}[engine_core]
    assert r["split"] == [rest, core]
    # every thread of this process, started before or after
    assert r["main"] == r["before"] == r["after"] == rest
    assert r["core"] == core
    assert r["worker"] == worker  # the worker keeps its core


def test_nothing_changes_without_a_bound_worker():
    script = ("import json, os; from server.engine.vllm_engine import _split_cores; "
              "before = sorted(os.sched_getaffinity(0)); r = _split_cores(set()); "
              "print(json.dumps([r, before == sorted(os.sched_getaffinity(0))]))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [None, True]
