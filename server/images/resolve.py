"""Host name resolution for image fetches, off the event loop and injectable.

A resolver is any `async (host, port) -> list[IPAddress]`; tests pass a dict-backed one
(`static_resolver`) so that "evil.example resolves to 10.0.0.1" needs no DNS.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence

from .urls import IPAddress

Resolver = Callable[[str, int], Awaitable[Sequence[IPAddress]]]


class ResolutionError(Exception):
    """The host name could not be resolved (no such host, DNS failure)."""


async def system_resolver(host: str, port: int) -> list[IPAddress]:
    """Resolve with the system resolver (`loop.getaddrinfo`, which runs in a thread).
    Returns the distinct addresses in the resolver's preference order; raises
    ResolutionError when there are none."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:
        raise ResolutionError(host) from exc
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
