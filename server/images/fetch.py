"""Fetching image bytes over http(s) without letting the URL reach internal services.

For every hop: check the host against the domain lists, resolve it once (injectable
resolver, off the event loop), require every address to pass the address policy, then
connect to a checked address: the request goes to the IP itself while the `Host` header
and the TLS SNI / certificate check keep the original name. Redirects are followed by
hand, each hop re-checked. The body is streamed under a byte cap; connect, read and total
deadlines apply. The HTTP exchange itself is the transport's (transport.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from .. import __version__
from ..errors import (
    ImageFetchError,
    ImageTooLargeError,
    ImageURLForbiddenError,
    ServiceUnavailableError,
)
from .policy import AddressPolicy, DomainPolicy
from .resolve import ResolutionError, Resolver
from .transport import (
    AiohttpTransport,
    CertificateFailed,
    ConnectFailed,
    IncomingResponse,
    OutgoingRequest,
    Transport,
    TransportError,
    TransportTimeout,
)
from .urls import HttpURL, IPAddress, join_redirect, redirect_failed

log = logging.getLogger(__name__)

USER_AGENT = f"qwen-vl-serve/{__version__} (image fetcher)"
#: Longest silence between two reads of one response (capped by the total deadline).
READ_TIMEOUT_SECONDS = 5.0
#: Addresses of one host tried in turn when connecting fails.
MAX_CONNECT_ATTEMPTS = 3
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


def human_bytes(n: int) -> str:
    """`20 MiB`, `512 KiB`, `100 bytes`: for client-facing limit messages."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n} bytes"


def too_large(max_bytes: int) -> ImageTooLargeError:
    """The error for an encoded image over the byte cap (fetched, data: or file:)."""
    return ImageTooLargeError(f"The image is larger than this server's limit of {human_bytes(max_bytes)}.")


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int
    total_timeout: float
    connect_timeout: float
    max_redirects: int
    read_timeout: float = READ_TIMEOUT_SECONDS


class HttpFetcher:
    """Fetches http(s) image URLs under the address and domain policies."""

    def __init__(
        self,
        transport: Transport,
        *,
        addresses: AddressPolicy,
        domains: DomainPolicy,
        resolver: Resolver,
        limits: FetchLimits,
        concurrency: int,
    ) -> None:
        """`transport` must connect to the address it is given, never through a proxy
        (`build_transport` makes the production one)."""
        self._transport = transport
        self._addresses = addresses
        self._domains = domains
        self._resolver = resolver
        self._limits = limits
        self._semaphore = asyncio.Semaphore(concurrency)

    async def fetch(self, url: HttpURL) -> bytes:
        """The body of `url` after redirects, within `total_timeout` seconds counted from
        the call: the wait for one of the `concurrency` fetch slots counts too, so slow
        hosts holding every slot delay other images by at most that long. Raises
        ImageURLForbiddenError (policy), ImageTooLargeError (byte cap), ImageFetchError
        (everything else), or ServiceUnavailableError (503, code image_fetch_busy) when no
        slot came free in time."""
        loop = asyncio.get_running_loop()
        called, fetching_since = loop.time(), None
        try:
            async with asyncio.timeout(self._limits.total_timeout):
                async with self._semaphore:
                    fetching_since = loop.time()
                    return await self._fetch(url)
        except TimeoutError:
            if fetching_since is None:
                raise ServiceUnavailableError(
                    f"The server's image fetches were all busy for {self._limits.total_timeout:g} s; "
                    "retry, or send the image as a data: URL.",
                    code="image_fetch_busy", headers={"Retry-After": "1"},
                ) from None
            waited = fetching_since - called
            queued = f" ({waited:.1f} s of it waiting for a free fetch slot)" if waited >= 0.1 else ""
            raise ImageFetchError(
                f"Fetching the image took longer than {self._limits.total_timeout:g} s{queued}. Use a faster "
                "host or send the image as a data: URL."
            ) from None

    async def _fetch(self, url: HttpURL) -> bytes:
        for hop in range(self._limits.max_redirects + 1):
            try:
                addresses = await self._check(url)
                async with self._send(url, addresses) as response:
                    if response.status not in REDIRECT_STATUSES:
                        if not 200 <= response.status < 300:
                            raise ImageFetchError(
                                f"The image server answered HTTP {response.status}; check the image URL.")
                        return await self._read_body(response)
                    location = response.headers.get("location")
                    if not location:
                        raise ImageFetchError("The image server sent a redirect without a Location.")
            except (ImageURLForbiddenError, ImageFetchError) as exc:
                if hop == 0:
                    raise
                raise redirect_failed(exc, str(url)) from exc.__cause__
            # (outside the hop's handler: a refused target is named by join_redirect itself)
            url = join_redirect(url, location)
        raise ImageFetchError(
            f"The image URL redirected more than {self._limits.max_redirects} times; link the image directly."
        )

    async def _check(self, url: HttpURL) -> list[IPAddress]:
        self._domains.check(url.host)
        if url.ip is not None:
            addresses = [url.ip]
        else:
            try:
                addresses = list(await self._resolver(url.host, url.port))
            except ResolutionError as exc:
                raise self._addresses.refusal(url.host) from exc
        self._addresses.check(url.host, addresses)
        return addresses

    @staticmethod
    def _request(url: HttpURL, ip: IPAddress) -> OutgoingRequest:
        headers = {
            "Host": url.host_header,
            "User-Agent": USER_AGENT,
            "Accept": "image/*",
            # Compressed transfer would let a small body inflate past the byte cap.
            "Accept-Encoding": "identity",
        }
        server_hostname = url.host if url.scheme == "https" and url.ip is None else None
        return OutgoingRequest(url.scheme, ip, url.port, url.target, headers, server_hostname)

    @asynccontextmanager
    async def _send(self, url: HttpURL, addresses: list[IPAddress]) -> AsyncIterator[IncomingResponse]:
        certificate_failed = False
        for ip in addresses[:MAX_CONNECT_ATTEMPTS]:
            try:
                async with self._transport.send(self._request(url, ip)) as response:
                    yield response
                    return
            except ConnectFailed as exc:
                certificate_failed = isinstance(exc, CertificateFailed)
                log.debug("image fetch: connecting to %s failed: %s", url.host, exc)
            except TransportTimeout:
                raise ImageFetchError("The image server did not answer in time.") from None
            except TransportError as exc:
                log.debug("image fetch from %s failed: %s", url.host, exc)
                raise ImageFetchError("The image server closed the connection or sent an invalid answer.") from None
        if certificate_failed:
            raise ImageFetchError(f"The image host '{url.host}' presented a TLS certificate that could not be "
                                  "verified for that name (self-signed, expired or for another host).")
        raise ImageFetchError(f"Could not connect to the image host '{url.host}'.")

    async def _read_body(self, response: IncomingResponse) -> bytes:
        cap = self._limits.max_bytes
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise too_large(cap)
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise ImageFetchError("The image server sent a compressed (Content-Encoding) body; serve the image as is.")
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in response.chunks():  # identity only: checked above
                size += len(chunk)
                if size > cap:
                    raise too_large(cap)
                chunks.append(chunk)
        except TransportTimeout:
            raise ImageFetchError("The image server stopped sending data.") from None
        except TransportError as exc:
            log.debug("image body read failed: %s", exc)
            raise ImageFetchError("The image download was cut off or malformed.") from None
        return b"".join(chunks)


def build_transport(limits: FetchLimits, concurrency: int) -> AiohttpTransport:
    """The transport the loader uses when none is injected, pool sized to the fetch
    concurrency and the per-read deadlines capped by the total one."""
    return AiohttpTransport(
        max_connections=concurrency,
        connect_timeout=min(limits.connect_timeout, limits.total_timeout),
        read_timeout=min(limits.read_timeout, limits.total_timeout),
    )
