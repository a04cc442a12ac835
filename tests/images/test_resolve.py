"""The system resolver's thread pool: one lookup per host in flight, shared by its callers,
and lookups that hang (a DNS server that never answers) held to their own threads."""

from __future__ import annotations

import asyncio
import ipaddress
import threading

import pytest

from server.images.resolve import ResolutionError, SystemResolver, lookup_addresses


class Lookups:
    """A fake getaddrinfo: "slow.example" blocks until released; counts calls per host."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, host: str, port: int):
        with self.lock:
            self.calls[host] = self.calls.get(host, 0) + 1
        if host == "slow.example":
            self.release.wait(10)
        if host.startswith("missing"):
            raise ResolutionError(host)
        return [ipaddress.ip_address("93.184.216.34")]


def test_concurrent_lookups_of_one_host_share_a_thread_and_a_hung_host_does_not_starve_others():
    lookups = Lookups()
    resolver = SystemResolver(max_lookups=2, lookup=lookups)

    async def scenario():
        slow = [asyncio.create_task(resolver("slow.example", 443)) for _ in range(10)]
        await asyncio.sleep(0.05)
        # ten callers of the hung host hold one thread; the other still answers
        fast = await asyncio.wait_for(resolver("fast.example", 443), 5)
        assert fast == [ipaddress.ip_address("93.184.216.34")]
        slow[0].cancel()  # a caller that gives up leaves the lookup to the others
        await asyncio.sleep(0.05)
        lookups.release.set()
        results = await asyncio.gather(*slow[1:])
        assert all(r == [ipaddress.ip_address("93.184.216.34")] for r in results)
        with pytest.raises(asyncio.CancelledError):
            await slow[0]

    try:
        asyncio.run(scenario())
    finally:
        lookups.release.set()
        resolver.close()
    assert lookups.calls == {"slow.example": 1, "fast.example": 1}


def test_a_failed_lookup_reaches_every_caller_and_is_not_remembered():
    lookups = Lookups()
    resolver = SystemResolver(max_lookups=2, lookup=lookups)

    async def scenario():
        for _ in range(2):
            results = await asyncio.gather(*(resolver("missing.example", 80) for _ in range(3)),
                                           return_exceptions=True)
            assert all(isinstance(r, ResolutionError) for r in results)

    try:
        asyncio.run(scenario())
    finally:
        resolver.close()
    assert lookups.calls["missing.example"] == 2  # one per round: shared, then not remembered


def test_the_real_lookup_reads_the_hosts_file():
    assert ipaddress.ip_address("127.0.0.1") in lookup_addresses("localhost", 80)
