"""Host name resolution for image fetches, off the event loop and injectable.

A resolver is any `async (host, port) -> list[IPAddress]`; tests pass a dict-backed one
(`static_resolver`) so that "evil.example resolves to 10.0.0.1" needs no DNS.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .urls import IPAddress

Resolver = Callable[[str, int], Awaitable[Sequence[IPAddress]]]


class ResolutionError(Exception):
    """The host name could not be resolved (no such host, DNS failure)."""


def lookup_addresses(host: str, port: int) -> list[IPAddress]:
    """Resolve with the system resolver (blocking: for a thread). Returns the distinct
    addresses in the resolver's preference order; raises ResolutionError when there are
    none."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:
        raise ResolutionError(host) from exc
    return _addresses(host, infos)


class SystemResolver:
    """The system resolver (getaddrinfo: /etc/hosts, nsswitch, the cluster's DNS) in a thread
    pool of its own, one lookup per host in flight.

    getaddrinfo cannot be cancelled: a lookup a fetch gave up on holds its thread until the
    system's own DNS timeout. In asyncio's default pool (a handful of threads, shared) a host
    whose DNS never answers starved every other lookup and anything else queued there; here
    such lookups hold at most `max_lookups` threads, and requests for the same host (a burst
    of pictures from one CDN) share one lookup instead of each taking a thread."""

    def __init__(self, max_lookups: int = 16,
                 lookup: Callable[[str, int], list[IPAddress]] = lookup_addresses) -> None:
        self._pool = ThreadPoolExecutor(max_lookups, thread_name_prefix="image-dns")
        self._lookup = lookup
        self._inflight: dict[tuple[str, int], asyncio.Future[list[IPAddress]]] = {}

    async def __call__(self, host: str, port: int) -> list[IPAddress]:
        loop = asyncio.get_running_loop()
        key = (host, port)
        lookup = self._inflight.get(key)
        if lookup is None or lookup.get_loop() is not loop:
            lookup = loop.run_in_executor(self._pool, self._lookup, host, port)
            self._inflight[key] = lookup
            lookup.add_done_callback(lambda done: self._finished(key, done))
        # shielded: a caller that gives up leaves the lookup to the others (it cannot be
        # stopped anyway)
        return list(await asyncio.shield(lookup))

    def _finished(self, key: tuple[str, int], done: asyncio.Future[list[IPAddress]]) -> None:
        if self._inflight.get(key) is done:
            del self._inflight[key]
        if not done.cancelled():
            done.exception()  # retrieved, so a lookup no caller waited for logs nothing

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _addresses(host: str, infos: list[tuple[Any, ...]]) -> list[IPAddress]:
    addresses: list[IPAddress] = []
    for family, _, _, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        ip = ipaddress.ip_address(sockaddr[0])  # keeps a %zone as scope_id
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise ResolutionError(host)
    return addresses


def static_resolver(table: Mapping[str, Sequence[str]]) -> Resolver:
    """A resolver answering from `table` (host -> addresses); unknown hosts fail."""

    async def resolve(host: str, port: int) -> list[IPAddress]:
        if host not in table:
            raise ResolutionError(host)
        return [ipaddress.ip_address(a) for a in table[host]]

    return resolve
