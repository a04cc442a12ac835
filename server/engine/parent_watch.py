"""The engine core outlives no server, and takes its orders to stop from the server alone.

vLLM's engine core is a child process of the server, and its model workers are children of
the engine core (they stop when it does). A server that exits normally stops the engine core
itself; one killed outright (SIGKILL, the OOM killer) did not, and the engine core and its
workers ran on as orphans, holding their memory (on a GPU, the device memory the restarted
server then needed).

The server puts its pid in QWENVL_SERVER_PID before it starts the engine; vLLM runs our
general plugin in each process it starts (see `server.qwen_vl.plugin`), which calls
`watch_parent()`. In the process whose parent is that pid (the engine core) a daemon thread
polls its parent once a second; when it changes (the parent died and the process was
reparented) it sends the process SIGTERM, which vLLM's engine core handles by stopping its
workers and exiting, and SIGKILL if it is still there 15 s later.

The same process also leaves the server's process group (its workers, started after, go with
it). A signal sent to a whole group (Ctrl+C in a terminal, `kill -- -PGID`, supervisord's
`stopasgroup`, `docker run -it`) then reaches the server only, which drains and stops the
engine itself; it used to reach the engine core and its workers too, which aborted every
request in flight at once (SIGTERM) or died under it (SIGINT). The session stays the same:
the kernel's autogroup scheduling, which is per session, is unchanged.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

ENV = "QWENVL_SERVER_PID"
_POLL_SECONDS = 1.0
_GRACE_SECONDS = 15.0

log = logging.getLogger(__name__)
_started = False


def watch_parent() -> None:
    """In the server's direct child (the engine core), once: leave the server's process
    group and start the watch. Elsewhere nothing."""
    global _started
    try:
        server = int(os.environ.get(ENV, ""))
    except ValueError:
        return
    if _started or os.getppid() != server:
        return
    _started = True
    _leave_server_group()
    threading.Thread(target=_watch, args=(server,), name="qwenvl-parent-watch", daemon=True).start()


def _leave_server_group() -> None:
    try:
        os.setpgid(0, 0)
    except OSError as exc:  # (a session leader cannot; nothing else should refuse)
        log.warning("the engine core stays in the server's process group: %s", exc)


def _watch(server: int) -> None:
    while os.getppid() == server:
        time.sleep(_POLL_SECONDS)
    log.warning("the server process (pid %d) is gone; stopping the engine", server)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(_GRACE_SECONDS)
    os.kill(os.getpid(), signal.SIGKILL)
