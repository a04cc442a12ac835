"""The one parser for image URLs. Everything later (policy checks, the request that is
sent, redirects) works on the objects returned here, never on the raw string, so what is
checked is exactly what is fetched.

Accepted: `http://host[:port]/path?query`, `https://...`, `data:image/...;base64,...` and
`file:///absolute/path`; an http(s) URL with non-ASCII characters is taken as a browser
sends it (a Unicode host in IDNA form, the rest percent-encoded). Refused while parsing, as
`image_url_forbidden`: other schemes, userinfo (`user@host`), backslashes, whitespace and
control characters, percent-encoded or non-canonical hosts (`2130706433`, `0x7f000001`, `0177.0.0.1`, `127.1`: the spellings that
some resolvers read as IPv4 numbers).
"""

from __future__ import annotations

import copy
import functools
import ipaddress
import re
import urllib.parse
from dataclasses import dataclass, field

from ..errors import ImageError, ImageURLForbiddenError, shown

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_HTTP_SCHEMES = {"http": 80, "https": 443}
#: Longest http(s) or file: URL accepted (data: URLs are bounded by the image byte cap).
MAX_URL_LENGTH = 8192
_MAX_SCHEME = 16
_MAX_DATA_HEADER = 256
# Visible ASCII except the backslash: anything else never belongs in a URL we accept.
_BAD_CHARS = re.compile(r"[^\x21-\x7e]|\\")
_BAD_CHARS_MESSAGE = ("The image URL contains whitespace, control characters, backslashes or "
                      "non-ASCII characters; percent-encode them.")
# In a redirect Location, only these are malformed: other non-ASCII is percent-encoded.
_SPACE_OR_CONTROL = re.compile(r"[\x00-\x20\x7f-\x9f\\\s]")
# What a header decoder (surrogateescape) makes of bytes that were not UTF-8.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
# WHATWG URL: a host whose last label is a number is parsed as an IPv4 address.
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
# Characters left unescaped in the path and query that is sent.
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = _PATH_SAFE + "?"


@dataclass(frozen=True)
class HttpURL:
    """An http(s) URL after validation. `host` is lower-case ASCII (IDNs as punycode) without a
    trailing dot, or the canonical text of an IP literal; `ip` is set for IP literals."""

    scheme: str
    host: str
    port: int
    target: str  # path and query, percent-encoded ASCII, starts with "/"
    ip: IPAddress | None = None

    @property
    def default_port(self) -> bool:
        return self.port == _HTTP_SCHEMES[self.scheme]

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if isinstance(self.ip, ipaddress.IPv6Address) else self.host
        return host if self.default_port else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host_header}{self.target}"


@dataclass(frozen=True)
class DataURL:
    """A `data:` URL: its media type, and where in `url` the still-encoded base64 payload
    starts (the payload, often megabytes, is not copied out of the URL string)."""

    media_type: str
    url: str = field(repr=False)
    start: int

    @property
    def payload(self) -> str:
        return self.url[self.start :]


@dataclass(frozen=True)
class FileURL:
    """A `file:` URL: the absolute, percent-decoded path (not yet normalised)."""

    path: str


ImageURL = HttpURL | DataURL | FileURL


def _forbidden(message: str) -> ImageURLForbiddenError:
    return ImageURLForbiddenError(message)


def parse_image_url(url: str) -> ImageURL:
    """Parse and validate an image URL. Raises ImageURLForbiddenError for a URL that is
    not allowed by its form alone, ImageError for one that is not a URL at all."""
    if not isinstance(url, str) or not url:
        raise ImageError("The image URL is empty.")
    if _SPACE_OR_CONTROL.match(url):  # (else the message would be that it has no scheme)
        raise _forbidden(_BAD_CHARS_MESSAGE)
    colon = url.find(":", 0, _MAX_SCHEME + 1)
    scheme = url[:colon].lower()
    if colon < 1 or not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
        raise ImageError("The image URL has no scheme; send an http(s):// URL or a data:image/...;base64 URL.")
    if scheme == "data":
        return _parse_data(url, colon + 1)
    if len(url) > MAX_URL_LENGTH:
        raise ImageError(f"The image URL is longer than {MAX_URL_LENGTH} characters.")
    if scheme in _HTTP_SCHEMES and not url.isascii():
        url = _as_browsers_send(url)
    if _BAD_CHARS.search(url):
        raise _forbidden(_BAD_CHARS_MESSAGE)
    if scheme in _HTTP_SCHEMES:
        return _parse_http(url)
    if scheme == "file":
        return _parse_file(url)
    raise _forbidden(f"The image URL scheme '{scheme}' is not allowed; use http, https or data.")


def _as_browsers_send(url: str) -> str:
    """An http(s) URL holding non-ASCII characters as a browser sends it: a Unicode host
    name in its IDNA form (`bücher.example` -> `xn--bcher-kva.example`), other non-ASCII
    characters percent-encoded as UTF-8. The result is then checked like any URL: a name
    that IDNA maps onto ASCII (full-width digits and dots) is validated, and its address
    policed, in that ASCII form."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        raise _forbidden("The image URL is malformed (bad host or port).") from None
    if "@" in parts.netloc:
        raise _forbidden("Image URLs with user information (user@host) are not allowed.")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise _forbidden("The image URL host is not a valid international domain name.") from None
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    elif parts.netloc.endswith(":"):
        netloc += ":"  # (refused as an empty port, as in ASCII)
    encode = functools.partial(re.sub, r"[^\x00-\x7f]+", lambda m: urllib.parse.quote(m.group(), safe=""))
    return urllib.parse.urlunsplit((parts.scheme, netloc, encode(parts.path), encode(parts.query), ""))


def join_redirect(base: HttpURL, location: str) -> HttpURL:
    """Resolve a redirect `Location` against `base` and validate the result like any image
    URL. A redirect to anything but http(s) is forbidden. Non-ASCII in `location` (servers
    do send raw UTF-8 there) is percent-encoded as browsers do before following it; bytes
    that were not UTF-8 arrive as surrogate escapes and are percent-encoded as those bytes."""
    if _SPACE_OR_CONTROL.search(location):
        raise _forbidden("The image server redirected to a malformed URL.")
    location = _ESCAPED_BYTE.sub(lambda m: f"%{ord(m.group()) - 0xDC00:02X}", location)
    try:
        target = urllib.parse.urljoin(str(base), location)
        scheme = urllib.parse.urlsplit(target).scheme.lower()
    except ValueError:  # e.g. an unclosed "[" in the host
        raise _forbidden("The image server redirected to a malformed URL.") from None
    if scheme not in _HTTP_SCHEMES:
        raise _forbidden("The image server redirected to a non-http(s) URL.")
    try:
        return parse_image_url(target)  # (an HttpURL: the scheme is http or https)
    except ImageError as exc:
        # (else a refusal of the target, say for user@host, reads as one of the URL sent)
        raise redirect_failed(exc, target) from None


def redirect_failed(exc: ImageError, target: str) -> ImageError:
    """`exc`, raised for the URL a redirect led to, with a message that names the redirect:
    otherwise the client reads a refusal or failure about a URL it never sent."""
    wrapped = copy.copy(exc)
    wrapped.message = f"The image URL redirected to {shown(target, 200)}, which failed: {exc.message}"
    wrapped.args = (wrapped.message,)
    return wrapped


def _parse_http(url: str) -> HttpURL:
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        raise _forbidden("The image URL is malformed (bad host or port).") from None
    scheme = parts.scheme.lower()
    netloc = parts.netloc
    if "@" in netloc:
        raise _forbidden("Image URLs with user information (user@host) are not allowed.")
    if netloc.endswith(":") or port == 0:
        raise _forbidden("The image URL has an empty or zero port.")
    host, ip = _parse_host(parts.hostname or "", bracketed=netloc.startswith("["))
    path = urllib.parse.quote(parts.path or "/", safe=_PATH_SAFE)
    if not path.startswith("/"):
        path = "/" + path
    if parts.query:
        path += "?" + urllib.parse.quote(parts.query, safe=_QUERY_SAFE)
    return HttpURL(scheme, host, port if port is not None else _HTTP_SCHEMES[scheme], path, ip)


def _parse_host(host: str, *, bracketed: bool) -> tuple[str, IPAddress | None]:
    if not host:
        raise _forbidden("The image URL has no host.")
    if bracketed:
        try:
            ip = ipaddress.IPv6Address(host)
        except ValueError:
            raise _forbidden("The image URL has a malformed IPv6 address.") from None
        if ip.scope_id:
            raise _forbidden("IPv6 zone identifiers are not allowed in image URLs.")
        return str(ip), ip
    if host.endswith("."):
        host = host[:-1]  # "example.com." is the same host; a second dot fails the label check
    try:
        return str(ipaddress.IPv4Address(host)), ipaddress.IPv4Address(host)
    except ValueError:
        pass
    labels = host.split(".")
    if _NUMERIC_LABEL.match(labels[-1]):
        raise _forbidden("The image URL host looks like a numeric IP address in a non-standard "
                         "spelling; write IPv4 addresses as four decimal numbers (a.b.c.d).")
    if len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise _forbidden("The image URL host is not a valid host name.")
    return host, None


def _parse_file(url: str) -> FileURL:
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # brackets in the host
        raise _forbidden("file: image URLs must not name a host; use file:///absolute/path.") from None
    if parts.netloc not in ("", "localhost"):
        raise _forbidden("file: image URLs must not name a host; use file:///absolute/path.")
    if parts.query:
        raise _forbidden("file: image URLs must not have a query.")
    path = urllib.parse.unquote(parts.path)
    if not path.startswith("/") or "\x00" in path or "\\" in path:
        raise _forbidden("file: image URLs need an absolute path (file:///path/to/image.png).")
    return FileURL(path)


#: Media types that say nothing about the data (a file of unknown type, the type left out):
#: accepted as vLLM's server accepts them; the decoder tells an image from anything else.
_UNTYPED = ("", "application/octet-stream")


def _parse_data(url: str, start: int) -> DataURL:
    comma = url.find(",", start, start + _MAX_DATA_HEADER)
    if comma < 0:
        raise ImageError("The data: image URL is malformed; use data:image/<type>;base64,<data>.")
    params = [p.strip().lower() for p in url[start:comma].split(";")]
    media_type = params[0]
    if "base64" not in params[1:]:
        raise ImageError("data: image URLs must be base64-encoded (data:image/<type>;base64,<data>).")
    if not media_type.startswith("image/") and media_type not in _UNTYPED:
        raise ImageError("The data: URL does not hold an image; its media type must be image/* "
                         "(or application/octet-stream).")
    return DataURL(media_type, url, comma + 1)
