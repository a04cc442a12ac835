"""The HTTP client under the image fetcher, behind a small seam.

`HttpFetcher` (fetch.py) owns the policy: which address to connect to, which headers to
send, redirects, byte caps. A transport only carries one already-checked request to one
already-checked address and hands back the status, headers and body chunks. Tests swap in a
fake transport to see exactly what would go on the wire without connecting anywhere.

`AiohttpTransport` is the production one. aiohttp is used rather than httpx because the
pool bookkeeping of httpcore 1.0 costs about 1.7 ms of CPU per request at 16 concurrent
fetches (it re-scans every pooled connection on each request start and finish), ten times
aiohttp's cost; see docs/benchmarks.md. Its pool keys a connection by address, port and TLS
server name, so a connection whose certificate was verified for one host name is never
reused for another name on the same address.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_exceptions import HttpProcessingError
from yarl import URL

from .urls import IPAddress

#: Size of the reads handed to the fetcher; the byte cap is checked after each.
CHUNK_BYTES = 64 * 1024

#: Interim (1xx) responses accepted before the final one; a server sends one or two.
MAX_INTERIM_RESPONSES = 8


@dataclass(frozen=True)
class OutgoingRequest:
    """A GET for `target` (path and query, percent-encoded ASCII) sent to `ip`:`port`.
    `server_hostname` is the TLS name for SNI and certificate checks (https to a host name);
    None for http and for https to a literal IP, which is then checked against the IP."""

    scheme: str
    ip: IPAddress
    port: int
    target: str
    headers: Mapping[str, str]
    server_hostname: str | None = None


class IncomingResponse(Protocol):
    """Status and headers of a response whose body is not read yet. `headers` looks names up
    case-insensitively. `chunks()` yields the body as sent (no content decoding)."""

    status: int
    headers: Mapping[str, str]

    def chunks(self) -> AsyncIterator[bytes]: ...


class TransportError(Exception):
    """The exchange failed after the connection was made: reset, cut off, malformed answer.
    The message is for logs only, never for clients."""


class ConnectFailed(TransportError):
    """No connection to this address (refused, unreachable, connect timeout, TLS handshake or
    certificate failure); the fetcher may try the host's next address."""


class CertificateFailed(ConnectFailed):
    """The TLS certificate did not verify for the host name (or address) asked for."""


class TransportTimeout(TransportError):
    """The server went silent for longer than the read timeout."""


class Transport(Protocol):
    def send(self, request: OutgoingRequest) -> AbstractAsyncContextManager[IncomingResponse]:
        """Connect and send `request`; the context yields the response once its headers
        arrived and releases the connection on exit (closing it if the body was not read to
        the end). Raises ConnectFailed, TransportTimeout or TransportError only."""
        ...

    async def aclose(self) -> None: ...


def default_ssl_context() -> ssl.SSLContext:
    """Verifying context with certifi's CA bundle when installed (what httpx and requests
    trust, and what slim container images have even without a system bundle), else the
    system's."""
    try:
        import certifi
    except ImportError:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=certifi.where())


class _InterimBoundedHandler(ResponseHandler):
    """aiohttp's connection protocol, failing the exchange after `MAX_INTERIM_RESPONSES`
    interim responses. aiohttp reads any number of them before the final response: a host
    answering with an endless stream of `100 Continue` kept the event loop busy parsing
    (every client's request, /health included, waited) and the fetch deadline could not fire
    until the stream stopped."""

    _interim = 0

    def feed_data(self, data, size: int = 0) -> None:
        code = data[0].code
        if 100 <= code < 200 and code != 101:
            self._interim += 1
            if self._interim > MAX_INTERIM_RESPONSES:
                if self._interim == MAX_INTERIM_RESPONSES + 1:
                    if self.transport is not None:
                        self.transport.close()
                    self.set_exception(HttpProcessingError(message="too many interim responses"))
                return
        super().feed_data(data, size)


class _AiohttpResponse:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers = response.headers

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_chunked(CHUNK_BYTES):
                yield chunk
        except aiohttp.ServerTimeoutError as exc:
            raise TransportTimeout(repr(exc)) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise TransportError(repr(exc)) from exc


class AiohttpTransport:
    """Transport on one aiohttp session: no proxy from the environment, no cookie jar (every
    request goes to an IP URL, so a jar would share one host's cookies with every name on
    that address), no redirects, no decompression, a pool of `max_connections`.

    The session is created on first use, inside the running event loop."""

    def __init__(
        self,
        *,
        max_connections: int,
        connect_timeout: float,
        read_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._max_connections = max_connections
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout)
        self._ssl = ssl_context
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, ssl=self._ssl or default_ssl_context(), use_dns_cache=False
            )
            # (a private attribute: aiohttp has no setting for the protocol it builds)
            connector._factory = functools.partial(_InterimBoundedHandler, loop=asyncio.get_running_loop())
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
                auto_decompress=False,
                skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
            )
        return self._session

    @asynccontextmanager
    async def send(self, request: OutgoingRequest) -> AsyncIterator[IncomingResponse]:
        host = f"[{request.ip}]" if request.ip.version == 6 else str(request.ip)
        url = URL(f"{request.scheme}://{host}:{request.port}{request.target}", encoded=True)
        try:
            response = await self._client().get(
                url,
                headers=dict(request.headers),
                allow_redirects=False,
                server_hostname=request.server_hostname,
            )
        except aiohttp.ClientConnectorCertificateError as exc:
            raise CertificateFailed(repr(exc)) from None
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise ConnectFailed(repr(exc)) from None
        except aiohttp.ServerTimeoutError as exc:
            raise TransportTimeout(repr(exc)) from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise TransportError(repr(exc)) from exc
        try:
            yield _AiohttpResponse(response)
        finally:
            response.release()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
