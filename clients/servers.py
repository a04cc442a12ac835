"""Start and stop API servers as child processes, for side-by-side runs.

Each server runs in its own session, so stopping it also ends the engine processes it
spawned: SIGTERM to the server's process group, then SIGKILL to every process of the session
after `stop_timeout` seconds (qwen-vl-serve's engine core leads a process group of its own).
Each also runs at a lower priority than the load generator (`SERVER_NICE` for its session,
the same for every server): the load generator stands in for clients on other machines,
which never wait for the servers' CPUs.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil


#: Nice value of every server's session (its scheduling group under the kernel's autogroups).
#: Only the group is lowered: the server's own threads keep the priorities they have in
#: production relative to each other (qwen-vl-serve runs its engine core 10 below its front end).
#: Measured on the 2-core machine, text only at 1 stream against qwen-vl-serve with vLLM's server
#: idle beside it: with the servers' sessions at 5, the load generator waited for a CPU 0.1-4.2 s
#: per 8 s run (1 run in 12 saw every response's tokens arrive together, /health p99 2.6-113 ms);
#: at 15, 13-72 ms (10 of 10 runs with /health p99 2.0-2.6 ms). At 0, (b) at 64 streams had
#: waves of 64 requests stalled for ~3 s in 3 of 6 runs.
SERVER_NICE = 15

#: Nice value of every server's processes where the kernel has no autogroups, so that plain
#: nice values decide (a value as low as this leaves room for the engine core's +10).
SERVER_PROCESS_NICE = 5


def lower_session_priority(pid: int, nice: int) -> None:
    """Give process `pid`'s session (which it leads) the nice value `nice` as a whole.

    With the kernel's autogroup scheduling (on by default in most distributions) every
    session is its own scheduling group, and groups share the CPUs equally whatever their
    processes' nice values: a server's busy engine then competes with the client's whole
    session. The group's nice value is what gives the client precedence. Does nothing where
    there is no autogroup (plain nice values then decide)."""
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))
    except OSError:
        pass


def session_nice(pid: int | str = "self") -> int | None:
    """The nice value of the autogroup (session) process `pid` belongs to, None where the
    kernel has no autogroups (or a sandbox shows an empty file, as CI's does)."""
    try:
        return parse_autogroup(Path(f"/proc/{pid}/autogroup").read_text())
    except OSError:
        return None


def autogroups_active() -> bool:
    """Whether the kernel schedules sessions as groups (autogroups on, and visible here)."""
    try:
        enabled = Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return False
    return enabled and session_nice() is not None


def parse_autogroup(text: str) -> int | None:
    """The nice value in a /proc/PID/autogroup line ("/autogroup-42 nice 5"), else None."""
    match = re.search(r"\bnice\s+(-?\d+)", text)
    return int(match.group(1)) if match else None


def priority_warning(client_nice: int | None, server_nice: int = SERVER_NICE) -> str | None:
    """What is wrong when the load generator's session does not run far enough ahead of the
    servers' (less than `SERVER_NICE` apart, the gap measured to keep the client from waiting).

    Seen here: a shell session left at nice 5 (by an earlier write to /proc/PID/autogroup that
    reached the shell's session instead of a server's), with the servers at 5 too, gave (d) at
    1 stream 14.7 req/s with all of a response's tokens arriving at once, where 24.3 req/s and
    1.7 ms between tokens were measured with the session at nice 0."""
    if client_nice is None or server_nice <= 0 or server_nice - client_nice >= SERVER_NICE:
        return None
    return (f"the load generator's session runs at autogroup nice {client_nice}, less than {SERVER_NICE} "
            f"below the servers' {server_nice}: the figures would measure the client's own waits for the CPU. "
            "Reset the shell's session first: echo 0 > /proc/$$/autogroup")


@dataclass
class ServerSpec:
    """How to run one server: `argv` (the port is already in it), extra environment, and
    the path that answers 200 once it can serve."""

    name: str
    argv: list[str]
    host: str
    port: int
    ready_path: str = "/health"
    env: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def ours_spec(model: str, host: str, port: int, engine: list[str], image_host: str, extra: list[str] = ()) -> ServerSpec:
    """qwen-vl-serve with the shared engine flags, allowed to fetch images from `image_host`."""
    argv = [sys.executable, "-m", "server.cli", "--model", model, "--host", host, "--port", str(port),
            *engine, "--image-allow-networks", f"{image_host}/32", *extra]
    return ServerSpec("qwen-vl-serve", argv, host, port, ready_path="/ready")


def vllm_spec(model: str, host: str, port: int, engine: list[str], image_host: str, extra: list[str] = ()) -> ServerSpec:
    """vLLM's OpenAI server (`python -m vllm.entrypoints.openai.api_server`; the `vllm`
    command does not start under the CPU build). vLLM fetches any http(s) URL unless
    `--allowed-media-domains` is set: the flag limits it to the image server's host."""
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--host", host, "--port", str(port), *engine, "--allowed-media-domains", image_host, *extra]
    return ServerSpec("vllm", argv, host, port, ready_path="/health")


class ManagedServer:
    """A server process. `start()` launches it; `wait_ready()` returns once `ready_path`
    and `/v1/models` answer 200, and raises RuntimeError if it exits or times out.

    `nice`: where the kernel groups sessions, the server's session gets this nice value and
    its processes keep the client's; elsewhere its processes run at `min(nice,
    SERVER_PROCESS_NICE)`. 0 leaves its priority alone."""

    def __init__(self, spec: ServerSpec, log_path: Path, stop_timeout: float = 30.0,
                 nice: int = SERVER_NICE) -> None:
        self.spec = spec
        self.log_path = log_path
        self.stop_timeout = stop_timeout
        self.nice = nice
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> "ManagedServer":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        grouped = autogroups_active()
        process_nice = min(self.nice, SERVER_PROCESS_NICE) if not grouped else 0
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.spec.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **self.spec.env}, start_new_session=True,
                preexec_fn=functools.partial(os.nice, process_nice) if process_nice else None,
            )
        if self.nice and grouped:
            lower_session_priority(self.proc.pid, self.nice)
        return self

    def wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        base = self.spec.base_url
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if (httpx.get(base + self.spec.ready_path, timeout=2, trust_env=False).status_code == 200
                        and httpx.get(base + "/v1/models", timeout=2, trust_env=False).status_code == 200):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.spec.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def cpu_split(self) -> tuple[float, float]:
        """CPU seconds used so far by the server process and by its engine processes."""
        if self.proc is None or self.proc.poll() is not None:
            return 0.0, 0.0
        return split_cpu(self.proc.pid)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL its session if still there after the
        timeout; the engine processes left over either way get SIGKILL too."""
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = self.proc.pid  # its own session: the group id is its pid
        _signal_group(pgid, signal.SIGTERM)
        try:
            self.proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            signal_session(pgid, signal.SIGKILL)
            self.proc.wait(10)
        # Engine processes may outlive the parent by a moment; end what is left of the session.
        signal_session(pgid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def signal_session(sid: int, sig: int) -> None:
    """Send `sig` to every process of session `sid`: the server's process group and the
    one qwen-vl-serve's engine core leads (see server.engine.parent_watch)."""
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                os.kill(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def process_tree_cpu(pid: int) -> float:
    """User + system CPU seconds of process `pid`, its live descendants and the descendants
    they have reaped (0 if gone)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            # children_*: descendants that already exited and were waited for.
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


def split_cpu(pid: int) -> tuple[float, float]:
    """(CPU seconds of process `pid` itself, CPU seconds of its live descendants): for an
    API server, its front end and its engine processes. (0, 0) if it is gone."""
    try:
        root = psutil.Process(pid)
        t = root.cpu_times()
        own = t.user + t.system
        children = root.children(recursive=True)
    except psutil.Error:
        return 0.0, 0.0
    rest = 0.0
    for p in children:
        try:
            c = p.cpu_times()
            rest += c.user + c.system
        except psutil.Error:
            pass
    return own, rest


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine's processes have run (all cores: user, nice, system,
    interrupts) since boot."""
    t = psutil.cpu_times()
    return t.user + t.system + sum(getattr(t, k, 0.0) for k in ("nice", "irq", "softirq"))
