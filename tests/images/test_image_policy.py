"""The address and domain policies as unit tests (no network), and the fetcher's use of
them with an injected resolver and a mock transport (nothing leaves the process)."""

from __future__ import annotations

import asyncio
import ipaddress

import httpx
import pytest

from server.errors import ImageFetchError, ImageURLForbiddenError
from server.images import static_resolver
from server.images.fetch import USER_AGENT, FetchLimits, HttpFetcher
from server.images.policy import AddressPolicy, DomainPolicy, embedded_ipv4, is_public
from server.images.urls import parse_image_url

import image_samples as samples

NOT_PUBLIC = [
    "127.0.0.1", "127.255.255.254", "10.0.0.1", "10.255.255.255", "172.16.0.1", "172.31.255.255",
    "192.168.1.1", "169.254.169.254", "169.254.0.1", "100.64.0.1", "100.127.255.254", "0.0.0.0",
    "0.1.2.3", "255.255.255.255", "224.0.0.1", "239.255.255.250", "240.0.0.1", "192.0.0.8",
    "192.0.2.1", "198.18.0.1", "198.51.100.1", "203.0.113.1",
    "::1", "::", "fc00::1", "fd12:3456::1", "fe80::1", "febf::1", "ff02::1", "ff0e::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::ffff:100.64.0.1", "::127.0.0.1",
    "2002:7f00:1::1", "2002:a00:1::1", "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "2001:db8::1",
    "2001::1",
]
PUBLIC = ["8.8.8.8", "1.1.1.1", "151.101.1.69", "2606:4700:4700::1111", "2a00:1450:4001::200e",
          "::ffff:8.8.8.8", "2002:808:808::1"]


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_non_public_addresses_are_refused(address):
    ip = ipaddress.ip_address(address)
    assert not is_public(ip)
    with pytest.raises(ImageURLForbiddenError) as info:
        AddressPolicy().check("some.host", [ip])
    assert address not in info.value.message  # no DNS oracle in the message


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address):
    assert is_public(ipaddress.ip_address(address))
    AddressPolicy().check("some.host", [ipaddress.ip_address(address)])


def test_zone_scoped_ipv6_is_refused():
    assert not is_public(ipaddress.ip_address("fe80::1%eth0"))


def test_embedded_ipv4_unwrapping():
    assert embedded_ipv4(ipaddress.ip_address("::ffff:10.1.2.3")) == ipaddress.IPv4Address("10.1.2.3")
    assert embedded_ipv4(ipaddress.ip_address("2002:7f00:1::")) == ipaddress.IPv4Address("127.0.0.1")
    assert embedded_ipv4(ipaddress.ip_address("64:ff9b::a00:1")) == ipaddress.IPv4Address("10.0.0.1")
    assert embedded_ipv4(ipaddress.ip_address("2606:4700::1")) is None


def test_allow_networks_are_exceptions_only_for_their_range():
    policy = AddressPolicy(["127.0.0.2/32", "10.0.0.0/8"])
    assert policy.allows(ipaddress.ip_address("127.0.0.2"))
    assert policy.allows(ipaddress.ip_address("::ffff:127.0.0.2"))
    assert policy.allows(ipaddress.ip_address("10.20.30.40"))
    for other in ("127.0.0.1", "127.0.0.3", "192.168.0.1", "169.254.169.254", "::1"):
        assert not policy.allows(ipaddress.ip_address(other))
    with pytest.raises(ValueError):
        AddressPolicy(["not-a-cidr"])


def test_every_resolved_address_must_pass():
    policy = AddressPolicy()
    with pytest.raises(ImageURLForbiddenError):
        policy.check("mixed.example", [ipaddress.ip_address("8.8.8.8"), ipaddress.ip_address("10.0.0.1")])
    with pytest.raises(ImageURLForbiddenError):
        policy.check("empty.example", [])


def test_domain_lists():
    allow = DomainPolicy(allowed=["Example.com", "*.cdn.test"], denied=["bad.example.com"])
    allow.check("example.com")
    allow.check("img.example.com")
    allow.check("a.cdn.test")
    for host in ("bad.example.com", "x.bad.example.com", "example.com.evil.test", "notexample.com", "cdn.test.evil"):
        with pytest.raises(ImageURLForbiddenError):
            allow.check(host)
    deny_only = DomainPolicy(denied=["evil.test"])
    deny_only.check("good.test")
    with pytest.raises(ImageURLForbiddenError):
        deny_only.check("www.evil.test")


# --- the fetcher with a fake resolver and a mock transport -----------------------------

LIMITS = FetchLimits(max_bytes=100_000, total_timeout=2.0, connect_timeout=1.0, max_redirects=2)


def fetch(url: str, table: dict[str, list[str]], handler=None, allow=("192.0.2.0/24",), allowed_domains=()):
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if handler is None:
            return httpx.Response(200, content=samples.png())
        return handler(request)

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(record)) as client:
            fetcher = HttpFetcher(client, addresses=AddressPolicy(allow), domains=DomainPolicy(allowed_domains),
                                  resolver=static_resolver(table), limits=LIMITS, concurrency=4)
            return await fetcher.fetch(parse_image_url(url))

    return asyncio.run(go()), seen


def test_request_goes_to_the_checked_address_with_the_name_in_host_and_sni():
    # 192.0.2.0/24 (TEST-NET-1) is allowed as an exception; the mock transport never connects.
    body, seen = fetch("https://images.example:8443/a/b.png?q=1", {"images.example": ["192.0.2.10"]})
    assert body == samples.png()
    (request,) = seen
    assert request.url.host == "192.0.2.10"
    assert request.url.port == 8443
    assert request.url.raw_path == b"/a/b.png?q=1"
    assert request.headers["host"] == "images.example:8443"
    assert request.extensions["sni_hostname"] == "images.example"
    assert request.headers["user-agent"] == USER_AGENT
    assert request.headers["accept-encoding"] == "identity"


def test_name_resolving_to_a_private_address_is_never_requested():
    for table in ({"evil.example": ["10.0.0.1"]}, {"evil.example": ["169.254.169.254"]},
                  {"evil.example": ["192.0.2.10", "127.0.0.1"]}, {"evil.example": ["::ffff:10.0.0.1"]},
                  {"evil.example": ["fd00::1"]}):
        with pytest.raises(ImageURLForbiddenError):
            fetch("http://evil.example/x.png", table)


def test_unresolvable_host():
    with pytest.raises(ImageFetchError) as info:
        fetch("http://nowhere.example/x.png", {})
    assert "could not be resolved" in info.value.message


def test_redirect_hops_are_rechecked():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/start":
            return httpx.Response(302, headers={"Location": "http://internal.example/secret"})
        return httpx.Response(200, content=b"secret")

    with pytest.raises(ImageURLForbiddenError):
        fetch("http://images.example/start", {"images.example": ["192.0.2.10"],
                                              "internal.example": ["10.1.2.3"]}, handler)


def test_redirect_to_an_unlisted_domain_is_refused():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"Location": "http://elsewhere.example/x.png"})

    with pytest.raises(ImageURLForbiddenError):
        fetch("http://images.example/x.png", {"images.example": ["192.0.2.10"], "elsewhere.example": ["192.0.2.11"]},
              handler, allowed_domains=["images.example"])


def test_http_errors_and_missing_location():
    with pytest.raises(ImageFetchError) as info:
        fetch("http://images.example/x.png", {"images.example": ["192.0.2.10"]}, lambda r: httpx.Response(404))
    assert "HTTP 404" in info.value.message
    with pytest.raises(ImageFetchError):
        fetch("http://images.example/x.png", {"images.example": ["192.0.2.10"]}, lambda r: httpx.Response(302))


def test_transport_failures_become_fetch_errors():
    def broken(exc):
        def handler(request: httpx.Request) -> httpx.Response:
            raise exc

        return handler

    table = {"images.example": ["192.0.2.10"]}
    for exc in (httpx.ConnectError("refused"), httpx.ReadError("reset"), httpx.RemoteProtocolError("junk"),
                httpx.ReadTimeout("slow"), httpx.ConnectTimeout("slow")):
        with pytest.raises(ImageFetchError) as info:
            fetch("http://images.example/x.png", table, broken(exc))
        assert str(exc) not in info.value.message
