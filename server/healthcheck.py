"""`qwen-vl-healthcheck`: the container's HEALTHCHECK. Exit 0 when the server in this
container answers `/health` with 200, 1 otherwise.

It asks the address the server really listens on: the server's own settings, read from its
command line (found in /proc) and the environment both share, the way the server reads them.
A check that read only `QWENVL_PORT` failed every server started with `--port`, or bound to
one address with `--host`; and with `--auth-health-endpoints` it sends one of the server's
keys.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

SERVER_COMMAND = "qwen-vl-serve"
SERVER_MODULE = "server.cli"


def server_argv(proc: Path = Path("/proc"), uid: int | None = None) -> list[str] | None:
    """The arguments of the server process (`qwen-vl-serve ...` or `python -m server.cli
    ...`) with the lowest pid (the one under the container's init), or None if none runs.
    Only processes of `uid` (default: this process's user) count: where processes of other
    users are visible (a shared process namespace), one of theirs must not name the address
    the check asks, nor receive a key."""
    uid = os.getuid() if uid is None else uid
    pids = sorted(int(p.name) for p in proc.iterdir() if p.name.isdigit())
    for pid in pids:
        with contextlib.suppress(OSError):
            if (proc / str(pid)).stat().st_uid != uid:
                continue
            argv = [a.decode("utf-8", "surrogateescape")
                    for a in (proc / str(pid) / "cmdline").read_bytes().split(b"\0")]
            if argv and argv[-1] == "":
                argv.pop()
            for i, arg in enumerate(argv[:4]):  # (behind an init and its "--" at most)
                if os.path.basename(arg) == SERVER_COMMAND:
                    return argv[i + 1:]
                if arg == "-m" and argv[i + 1:i + 2] == [SERVER_MODULE]:
                    return argv[i + 2:]
    return None


def health_url(host: str, port: int) -> str:
    """Where to reach a server bound to `host`: a wildcard address is asked on loopback."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return f"http://{host}:{port}/health"  # a name
    if address.is_unspecified:
        address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
    shown = f"[{address}]" if address.version == 6 else str(address)
    return f"http://{shown}:{port}/health"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen-vl-healthcheck", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds to wait for the answer")
    own, server_args = parser.parse_known_args(argv)
    from server.cli import parse_settings

    if not server_args:
        server_args = server_argv() or []
    try:
        settings = parse_settings(server_args)
    except SystemExit:  # (parse_settings said why; Docker reserves exit status 2)
        return 1
    request = urllib.request.Request(health_url(settings.host, settings.port))
    keys = settings.all_api_keys()
    if settings.auth_health_endpoints and keys:
        request.add_header("Authorization", f"Bearer {keys[0]}")
    # (no proxy: a proxy from the environment must not answer for this container's server)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=own.timeout) as response:
            ok = response.status == 200
    except (urllib.error.URLError, OSError) as exc:
        print(f"unhealthy: {request.full_url}: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
