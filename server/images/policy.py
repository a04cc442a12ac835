"""Which hosts and addresses image URLs may reach.

`AddressPolicy` implements the public-address rule: every address a host resolves to must
be globally routable, unless it lies in one of the configured exception networks
(`--image-allow-networks`). IPv6 addresses that embed an IPv4 address (IPv4-mapped,
6to4, NAT64, Teredo) are judged by the embedded address as well.
`DomainPolicy` applies the optional allow-list and deny-list of host names.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from ..errors import ImageURLForbiddenError
from .urls import IPAddress

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# Blocks that Python's `is_global` still calls global (depending on the Python release) but
# that no image host lives in.
_EXTRA_BLOCKED: tuple[IPNetwork, ...] = (
    ipaddress.IPv4Network("192.0.0.0/24"),  # IETF protocol assignments
    ipaddress.IPv4Network("192.88.99.0/24"),  # 6to4 relay anycast (deprecated, RFC 7526)
    ipaddress.IPv4Network("255.255.255.255/32"),
    ipaddress.IPv6Network("ff00::/8"),
    ipaddress.IPv6Network("fec0::/10"),  # site-local (deprecated, still routed on some sites)
    ipaddress.IPv6Network("3fff::/20"),  # documentation (RFC 9637), as 2001:db8::/32
    ipaddress.IPv6Network("64:ff9b:1::/48"),  # local-use NAT64 (RFC 8215): a site's own translator
)


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address carried inside an IPv6 address (mapped, 6to4, NAT64, Teredo server
    and client), or None."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def is_public(ip: IPAddress) -> bool:
    """True when `ip` is globally routable: not loopback, private (RFC 1918, unique-local),
    link-local (169.254/16 with cloud metadata, fe80::/10), CGNAT (100.64/10), multicast,
    reserved, unspecified or broadcast. Embedded IPv4 addresses must be public too."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return False
        if ip.ipv4_mapped is not None:
            return is_public(ip.ipv4_mapped)
        if ip in _NAT64:  # a public IPv4 host reached through a DNS64/NAT64 gateway
            return is_public(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        inner = embedded_ipv4(ip)
        if inner is not None and not is_public(inner):
            return False
    if (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    ):
        return False
    return not any(ip.version == net.version and ip in net for net in _EXTRA_BLOCKED)


class AddressPolicy:
    """Decides whether an image fetch may connect to an address."""

    def __init__(self, allow_networks: Iterable[str | IPNetwork] = ()) -> None:
        """`allow_networks`: CIDRs exempt from the public-address rule. Raises ValueError
        for a malformed CIDR (a configuration error, reported at startup)."""
        self.allow_networks: tuple[IPNetwork, ...] = tuple(
            net if isinstance(net, (ipaddress.IPv4Network, ipaddress.IPv6Network))
            else ipaddress.ip_network(net.strip(), strict=False)
            for net in allow_networks
        )

    def allows(self, ip: IPAddress) -> bool:
        """True when `ip` is public or inside an exception network. An IPv4-mapped or NAT64
        (64:ff9b::/96) IPv6 address is matched as its IPv4 address."""
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            elif ip in _NAT64:
                ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if any(ip.version == net.version and ip in net for net in self.allow_networks):
            return True
        return is_public(ip)

    def check(self, host: str, addresses: Sequence[IPAddress]) -> None:
        """Raise `refusal(host)` unless `host` has addresses and every one is allowed."""
        if not addresses or not all(self.allows(ip) for ip in addresses):
            raise self.refusal(host)

    @staticmethod
    def refusal(host: str) -> ImageURLForbiddenError:
        """The one refusal for a host without an allowed address, whether it resolved to a
        non-public one or to none at all: two answers would let a client tell the internal
        names that exist (`redis`, `db.default.svc.cluster.local`) from those that do not.
        It names the host, never an address."""
        return ImageURLForbiddenError(
            f"The image host '{host}' has no public address (it does not resolve, or resolves to a "
            "private, loopback, link-local or otherwise non-public address); image URLs must point "
            "to a public host (unless the server's --image-allow-networks admits that network)."
        )


def normalise_domain(domain: str) -> str:
    """A domain-list entry as `HttpURL.host` spells hosts: lower case, no wildcard or trailing
    dot, a Unicode name in its ASCII (IDNA) form, which is what URLs carry (an entry written
    `bücher.example` never matched, and a deny-list entry that never matches fails open).
    Raises ValueError for a name IDNA cannot encode."""
    name = domain.strip().rstrip(".").removeprefix("*.").removeprefix(".")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"{domain!r} is not a valid domain name") from None
    return name.lower()


class DomainPolicy:
    """Optional allow-list and deny-list of image hosts. An entry matches the host itself
    and its subdomains (`example.com` matches `cdn.example.com`). The deny-list wins."""

    def __init__(self, allowed: Iterable[str] = (), denied: Iterable[str] = ()) -> None:
        self.allowed = tuple(d for d in map(normalise_domain, allowed) if d)
        self.denied = tuple(d for d in map(normalise_domain, denied) if d)

    @staticmethod
    def _matches(host: str, domains: Sequence[str]) -> bool:
        return any(host == d or host.endswith("." + d) for d in domains)

    def check(self, host: str) -> None:
        """Raise ImageURLForbiddenError when `host` (normalised, as `HttpURL.host`) is denied
        or an allow-list is set and does not cover it."""
        if self._matches(host, self.denied):
            raise ImageURLForbiddenError(f"Images from '{host}' are not allowed on this server.")
        if self.allowed and not self._matches(host, self.allowed):
            raise ImageURLForbiddenError(
                f"Images from '{host}' are not allowed on this server; it only fetches images from "
                "its configured domains. Send the image as a data: URL instead."
            )
