"""The address and domain policies as unit tests (no network), and the fetcher's use of
them with an injected resolver and a fake transport (nothing leaves the process)."""

from __future__ import annotations

import asyncio
import ipaddress
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from multidict import CIMultiDict

from server.errors import ImageFetchError, ImageTooLargeError, ImageURLForbiddenError
from server.images import static_resolver
from server.images.fetch import USER_AGENT, FetchLimits, HttpFetcher
from server.images.policy import AddressPolicy, DomainPolicy, embedded_ipv4, is_public
from server.images.transport import ConnectFailed, OutgoingRequest, TransportError, TransportTimeout
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
    "2001::1", "fec0::1", "feff::1", "192.88.99.1", "3fff::1", "3fff:fff:ffff::1", "64:ff9b:1::a00:1",
    "64:ff9b:1::808:808",
]
PUBLIC = ["8.8.8.8", "1.1.1.1", "151.101.1.69", "2606:4700:4700::1111", "2a00:1450:4001::200e",
          "::ffff:8.8.8.8", "2002:808:808::1", "64:ff9b::808:808", "64:ff9b::8.8.4.4"]


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
    assert policy.allows(ipaddress.ip_address("64:ff9b::127.0.0.2"))  # NAT64 of an allowed address
    for other in ("127.0.0.1", "127.0.0.3", "192.168.0.1", "169.254.169.254", "::1", "64:ff9b::a9fe:a9fe"):
        assert not policy.allows(ipaddress.ip_address(other))
    # an operator's NAT64 range exempts no private address behind it
    nat64 = AddressPolicy(["64:ff9b::/96"])
    assert not nat64.allows(ipaddress.ip_address("64:ff9b::a9fe:a9fe"))
    assert nat64.allows(ipaddress.ip_address("64:ff9b::808:808"))
    with pytest.raises(ValueError):
        AddressPolicy(["not-a-cidr"])


def test_every_resolved_address_must_pass():
    policy = AddressPolicy()
    with pytest.raises(ImageURLForbiddenError) as info:
        policy.check("mixed.example", [ipaddress.ip_address("8.8.8.8"), ipaddress.ip_address("10.0.0.1")])
    # names the host and the setting that admits such networks, never the addresses
    assert "'mixed.example'" in str(info.value) and "--image-allow-networks" in str(info.value)
    assert "10.0.0.1" not in str(info.value)
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


def test_domain_entries_in_unicode_match_the_ascii_form_urls_carry():
    """A deny-list entry written `bücher.example` never matched (URLs carry the IDNA form),
    so it failed open; an allow-list one failed closed."""
    denied = DomainPolicy(denied=["Bücher.example"])
    for host in ("xn--bcher-kva.example", "img.xn--bcher-kva.example"):
        with pytest.raises(ImageURLForbiddenError):
            denied.check(host)
    DomainPolicy(allowed=["bücher.example"]).check("xn--bcher-kva.example")
    from server.settings import Settings

    with pytest.raises(ValueError, match="not a valid domain name"):
        Settings(image_denied_domains=["a" * 70 + "ü.example"])


# --- the fetcher with a fake resolver and a fake transport ------------------------------

LIMITS = FetchLimits(max_bytes=100_000, total_timeout=2.0, connect_timeout=1.0, max_redirects=2)


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    fail_body: Exception | None = None  # raised after the first chunk


class FakeResponse:
    def __init__(self, reply: Reply) -> None:
        self.status = reply.status
        self.headers = CIMultiDict(reply.headers)
        self._reply = reply

    async def chunks(self):
        yield self._reply.body[:10]
        if self._reply.fail_body is not None:
            raise self._reply.fail_body
        yield self._reply.body[10:]


class FakeTransport:
    """Records each request; `handler(request)` returns a Reply or raises a transport error."""

    def __init__(self, handler) -> None:
        self.handler = handler
        self.seen: list[OutgoingRequest] = []
        self.closed = False

    @asynccontextmanager
    async def send(self, request: OutgoingRequest):
        self.seen.append(request)
        yield FakeResponse(self.handler(request))

    async def aclose(self) -> None:
        self.closed = True


def fetch(url: str, table: dict[str, list[str]], handler=None, allow=("192.0.2.0/24",), allowed_domains=()):
    transport = FakeTransport(handler or (lambda request: Reply(body=samples.png())))

    async def go():
        fetcher = HttpFetcher(transport, addresses=AddressPolicy(allow), domains=DomainPolicy(allowed_domains),
                              resolver=static_resolver(table), limits=LIMITS, concurrency=4)
        return await fetcher.fetch(parse_image_url(url))

    return asyncio.run(go()), transport.seen


def test_request_goes_to_the_checked_address_with_the_name_in_host_and_sni():
    # 192.0.2.0/24 (TEST-NET-1) is allowed as an exception; the fake transport never connects.
    body, seen = fetch("https://images.example:8443/a/b.png?q=1", {"images.example": ["192.0.2.10"]})
    assert body == samples.png()
    (request,) = seen
    assert request.scheme == "https"
    assert request.ip == ipaddress.ip_address("192.0.2.10")
    assert request.port == 8443
    assert request.target == "/a/b.png?q=1"
    assert request.headers["Host"] == "images.example:8443"
    assert request.server_hostname == "images.example"
    assert request.headers["User-Agent"] == USER_AGENT
    assert request.headers["Accept-Encoding"] == "identity"


def test_tls_name_is_only_set_for_https_to_a_host_name():
    _, seen = fetch("http://images.example/x.png", {"images.example": ["192.0.2.10"]})
    assert seen[0].server_hostname is None and seen[0].headers["Host"] == "images.example"
    _, seen = fetch("https://192.0.2.10/x.png", {})
    assert seen[0].server_hostname is None and seen[0].headers["Host"] == "192.0.2.10"


def test_next_address_is_tried_when_connecting_fails():
    def handler(request):
        if request.ip == ipaddress.ip_address("192.0.2.10"):
            raise ConnectFailed("refused")
        return Reply(body=b"image")

    body, seen = fetch("http://images.example/x.png", {"images.example": ["192.0.2.10", "192.0.2.11"]}, handler)
    assert body == b"image"
    assert [str(r.ip) for r in seen] == ["192.0.2.10", "192.0.2.11"]


def test_name_resolving_to_a_private_address_is_never_requested():
    for table in ({"evil.example": ["10.0.0.1"]}, {"evil.example": ["169.254.169.254"]},
                  {"evil.example": ["192.0.2.10", "127.0.0.1"]}, {"evil.example": ["::ffff:10.0.0.1"]},
                  {"evil.example": ["fd00::1"]}):
        with pytest.raises(ImageURLForbiddenError):
            fetch("http://evil.example/x.png", table)


def test_an_unresolvable_host_gets_the_answer_of_a_private_one():
    """One answer for both: two told a client which internal names exist (`redis`, a
    cluster service) and which do not."""
    with pytest.raises(ImageURLForbiddenError) as missing:
        fetch("http://nowhere.example/x.png", {})
    with pytest.raises(ImageURLForbiddenError) as private:
        fetch("http://nowhere.example/x.png", {"nowhere.example": ["10.1.2.3"]})
    assert missing.value.message == private.value.message
    assert missing.value.code == private.value.code == "image_url_forbidden"
    assert "'nowhere.example'" in missing.value.message and "10.1.2.3" not in private.value.message


def test_redirect_hops_are_rechecked():
    def handler(request):
        if request.target == "/start":
            return Reply(302, headers={"Location": "http://internal.example/secret"})
        return Reply(body=b"secret")

    with pytest.raises(ImageURLForbiddenError):
        fetch("http://images.example/start", {"images.example": ["192.0.2.10"],
                                              "internal.example": ["10.1.2.3"]}, handler)


def test_redirect_is_followed_to_the_new_host_address():
    def handler(request):
        if request.target == "/start":
            return Reply(301, headers={"location": "https://cdn.example/img/x.png"})
        return Reply(body=b"image")

    body, seen = fetch("http://images.example/start", {"images.example": ["192.0.2.10"],
                                                       "cdn.example": ["192.0.2.20"]}, handler)
    assert body == b"image"
    assert (str(seen[1].ip), seen[1].port, seen[1].target) == ("192.0.2.20", 443, "/img/x.png")
    assert seen[1].headers["Host"] == "cdn.example" and seen[1].server_hostname == "cdn.example"


def test_redirect_to_an_unlisted_domain_is_refused():
    def handler(request):
        return Reply(302, headers={"Location": "http://elsewhere.example/x.png"})

    with pytest.raises(ImageURLForbiddenError):
        fetch("http://images.example/x.png", {"images.example": ["192.0.2.10"], "elsewhere.example": ["192.0.2.11"]},
              handler, allowed_domains=["images.example"])


def test_http_errors_and_missing_location():
    with pytest.raises(ImageFetchError) as info:
        fetch("http://images.example/x.png", {"images.example": ["192.0.2.10"]}, lambda r: Reply(404))
    assert "HTTP 404" in info.value.message
    with pytest.raises(ImageFetchError) as info:
        fetch("http://images.example/x.png", {"images.example": ["192.0.2.10"]}, lambda r: Reply(302))
    assert "without a Location" in info.value.message


def test_declared_and_streamed_sizes_over_the_cap():
    table = {"images.example": ["192.0.2.10"]}
    declared = Reply(body=b"x", headers={"Content-Length": str(LIMITS.max_bytes + 1)})
    with pytest.raises(ImageTooLargeError):
        fetch("http://images.example/x.png", table, lambda r: declared)
    with pytest.raises(ImageTooLargeError):  # no length given, the body runs over
        fetch("http://images.example/x.png", table, lambda r: Reply(body=b"x" * (LIMITS.max_bytes + 1)))
    body, _ = fetch("http://images.example/x.png", table, lambda r: Reply(body=b"x" * LIMITS.max_bytes))
    assert len(body) == LIMITS.max_bytes


def test_transport_failures_become_fetch_errors():
    def broken(exc):
        def handler(request):
            raise exc

        return handler

    table = {"images.example": ["192.0.2.10"]}
    cases = [(ConnectFailed("refused 10.9.8.7"), "Could not connect"),
             (TransportTimeout("slow 10.9.8.7"), "did not answer in time"),
             (TransportError("junk 10.9.8.7"), "closed the connection or sent an invalid answer")]
    for exc, message in cases:
        with pytest.raises(ImageFetchError) as info:
            fetch("http://images.example/x.png", table, broken(exc))
        assert message in info.value.message and "10.9.8.7" not in info.value.message
    body_cases = [(TransportTimeout("slow 10.9.8.7"), "stopped sending data"),
                  (TransportError("reset 10.9.8.7"), "cut off or malformed")]
    for exc, message in body_cases:
        with pytest.raises(ImageFetchError) as info:
            fetch("http://images.example/x.png", table, lambda r, exc=exc: Reply(body=b"y" * 100, fail_body=exc))
        assert message in info.value.message and "10.9.8.7" not in info.value.message
