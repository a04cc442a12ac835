"""The one URL parser: what it accepts, and the spellings it refuses outright."""

from __future__ import annotations

import ipaddress

import pytest

from server.errors import ImageError, ImageURLForbiddenError
from server.images.urls import DataURL, FileURL, HttpURL, join_redirect, parse_image_url


def test_http_url_is_normalised():
    url = parse_image_url("HTTP://Images.Example.COM./a%20b/c.png?x=1&y=%2F#frag")
    assert url == HttpURL("http", "images.example.com", 80, "/a%20b/c.png?x=1&y=%2F")
    assert url.host_header == "images.example.com"
    assert str(url) == "http://images.example.com/a%20b/c.png?x=1&y=%2F"


def test_https_port_and_ip_literals():
    url = parse_image_url("https://example.com:8443")
    assert (url.port, url.target, url.host_header) == (8443, "/", "example.com:8443")
    v6 = parse_image_url("http://[2001:DB8::1]:8080/x")
    assert v6.ip == ipaddress.IPv6Address("2001:db8::1")
    assert v6.host_header == "[2001:db8::1]:8080"
    assert parse_image_url("http://192.0.2.7/").ip == ipaddress.IPv4Address("192.0.2.7")


@pytest.mark.parametrize(
    "url",
    [
        "gopher://127.0.0.2/x",
        "ftp://127.0.0.2/x.png",
        "javascript:alert(1)",
        "http://allowed@127.0.0.1/",
        "http://user:pass@example.com/",
        "http://example.com\\@127.0.0.1/",
        "http://127.0.0.2\\.127.0.0.1/",
        "http://example.com/a\\b",
        "http://exa mple.com/",
        "http://example.com/\n.png",
        "http://example.com\t/",
        "http://2130706433/",
        "http://ä@bücher.example/",
        "http://bücher.example/\u00e4 b.png",  # (an ASCII space stays refused)
        "http://bücher.example:99999/",
        "http://0x7f000001/",
        "http://0177.0.0.1/",
        "http://127.1/",
        "http://127.0.0.0x1/",
        "http://%31%32%37.0.0.1/",
        "http://example.com:0/",
        "http://example.com:/",
        "http://example.com:99999/",
        "http://[::1%25eth0]/",
        "http://[fe80::1/",
        "http:///x.png",
        "http:example.com/x.png",
        "http://-bad-.example/",
        "http://a..b/",
        "file://otherhost/etc/passwd",
        "file:relative/path.png",
    ],
)
def test_refused_spellings(url):
    with pytest.raises(ImageURLForbiddenError) as info:
        parse_image_url(url)
    assert info.value.code == "image_url_forbidden"
    assert info.value.status == 400


def test_unicode_hosts_and_paths_are_sent_as_browsers_send_them():
    """A Unicode host name was refused with advice to percent-encode it, which makes it no
    host name at all; it goes in its IDNA form, other non-ASCII characters percent-encoded.
    What IDNA maps onto ASCII is then checked in that form."""
    url = parse_image_url("https://Bücher.example:8443/bild/ä.png?q=ü")
    assert (url.host, url.port, url.target) == ("xn--bcher-kva.example", 8443, "/bild/%C3%A4.png?q=%C3%BC")
    assert url.host_header == "xn--bcher-kva.example:8443" and url.ip is None
    full_width = parse_image_url("http://127\uff0e0\uff0e0\uff0e1/x.png")  # 127．0．0．1
    assert full_width.ip == ipaddress.IPv4Address("127.0.0.1")
    with pytest.raises(ImageURLForbiddenError):
        parse_image_url("http://\uff10x7f000001/")  # ０x7f000001: a non-standard numeric spelling
    with pytest.raises(ImageURLForbiddenError) as info:
        parse_image_url("http://\u2024/")
    assert "not a valid" in info.value.message


@pytest.mark.parametrize("url", ["", "no-scheme.png", "http://example.com/" + "a" * 9000,
                                 "data:text/plain;base64,aGk=", "data:image/png,rawbytes", "data:image/png;base64"])
def test_malformed_or_non_image(url):
    with pytest.raises(ImageError) as info:
        parse_image_url(url)
    assert info.value.code == "invalid_image"


def test_data_and_file_urls():
    data = parse_image_url("data:image/PNG;base64,iVBO")
    assert isinstance(data, DataURL) and (data.media_type, data.payload) == ("image/png", "iVBO")
    assert parse_image_url("file:///srv/media/a%20b.png") == FileURL("/srv/media/a b.png")
    assert parse_image_url("file://localhost/srv/x.png") == FileURL("/srv/x.png")


def test_redirects_are_resolved_then_checked_like_any_url():
    base = parse_image_url("https://cdn.example.com/img/a.png")
    assert join_redirect(base, "b.png") == HttpURL("https", "cdn.example.com", 443, "/img/b.png")
    assert join_redirect(base, "//other.example/x").host == "other.example"
    assert join_redirect(base, "http://127.0.0.1:8080/").ip == ipaddress.IPv4Address("127.0.0.1")
    for location in ("file:///etc/passwd", "data:image/png;base64,AAAA", "ftp://x/y", "http://a\\@b/",
                     "http://2130706433/"):
        with pytest.raises(ImageURLForbiddenError):
            join_redirect(base, location)


def test_a_refused_redirect_target_is_named_not_blamed_on_the_url_sent():
    """A Location of http://user@10.0.0.1/ was refused as if the client's own URL held user
    information, and ftp:// got the scheme refusal meant for the URL sent."""
    base = parse_image_url("https://cdn.example.com/img/a.png")
    for location, reason in (("http://user@10.0.0.1/", "Image URLs with user information"),
                             ("http://0x0a000001/x.png", "")):
        with pytest.raises(ImageURLForbiddenError) as info:
            join_redirect(base, location)
        assert info.value.message.startswith(f"The image URL redirected to {location}, which failed: {reason}")
    for location in ("ftp://10.0.0.1/", "FILE:///etc/passwd", "gopher://x/"):
        with pytest.raises(ImageURLForbiddenError) as info:
            join_redirect(base, location)
        assert info.value.message == "The image server redirected to a non-http(s) URL."


def test_leading_whitespace_is_named_as_such():
    for url in (" http://example.com/a.png", "\thttps://example.com/a.png", "\x00data:image/png;base64,AA"):
        with pytest.raises(ImageURLForbiddenError) as info:
            parse_image_url(url)
        assert "contains whitespace, control characters" in info.value.message


def test_non_ascii_in_a_redirect_location_is_percent_encoded_as_browsers_do():
    base = parse_image_url("https://cdn.example.com/img/a.png")
    assert join_redirect(base, "/bilder/straße.png?q=ü").target == "/bilder/stra%C3%9Fe.png?q=%C3%BC"
    assert join_redirect(base, "//bücher.example/x.png").host == "xn--bcher-kva.example"
    # A Latin-1 byte, not UTF-8, as a surrogateescape header decoder hands it over.
    assert join_redirect(base, "caf\udce9.png").target == "/img/caf%E9.png"
    for location in ("/a b.png", "/a\u00a0b.png", "/a\x85b.png", "/a\tb.png", "/a\\b.png"):
        with pytest.raises(ImageURLForbiddenError) as info:
            join_redirect(base, location)
        assert "malformed" in info.value.message


@pytest.mark.parametrize("url", ["file://[x]/a.png", "file://]", "file://[::1/a.png", "file://a]b/c"])
def test_file_urls_with_brackets_are_refused_not_crashed(url):
    with pytest.raises(ImageURLForbiddenError):
        parse_image_url(url)


@pytest.mark.parametrize("location", ["http://[::1/", "http://]/", "//[x", "http://[f,-6(]"])
def test_malformed_redirect_locations_are_refused(location):
    base = parse_image_url("https://cdn.example.com/img/a.png")
    with pytest.raises(ImageURLForbiddenError) as info:
        join_redirect(base, location)
    assert "malformed" in info.value.message
