"""Fetching from real servers on loopback addresses. The image server listens on 127.0.0.2,
which the tests allow (--image-allow-networks 127.0.0.2/32); everything else, including a
canary server on 127.0.0.1, must be refused before any connection is made."""

from __future__ import annotations

import asyncio
import datetime
import ssl
import time

import pytest

from server.errors import ImageFetchError, ImageTooLargeError, ImageURLForbiddenError
from server.images import static_resolver
from server.images.fetch import USER_AGENT
from server.images.transport import AiohttpTransport

import image_samples as samples
from image_helpers import load_one, make_settings, use_loader
from support.http_server import raw, redirect, silent, start_server, static


def test_allowed_server_serves_an_image(image_server):
    loaded = load_one(image_server.url("/red.png"))
    assert loaded.image.mode == "RGB" and loaded.original_size == (64, 48)
    path, headers = image_server.requests[-1]
    assert path == "/red.png"
    assert headers["User-Agent"] == USER_AGENT
    assert headers["Host"] == f"127.0.0.2:{image_server.port}"


def test_host_name_is_kept_in_the_host_header(image_server):
    resolver = static_resolver({"images.test": ["127.0.0.2"]})
    loaded = load_one(f"http://images.test:{image_server.port}/blue.png", resolver=resolver)
    assert loaded.image.getpixel((0, 0)) == (0, 0, 255)
    assert image_server.requests[-1][1]["Host"] == f"images.test:{image_server.port}"


def forbidden_urls(canary, image_server) -> list[str]:
    p = canary.port
    return [
        f"http://127.0.0.1:{p}/red.png",
        f"http://localhost:{p}/red.png",
        f"http://[::1]:{p}/red.png",
        f"http://[::ffff:127.0.0.1]:{p}/red.png",
        f"http://[::ffff:7f00:1]:{p}/red.png",
        f"http://0.0.0.0:{p}/red.png",
        f"http://2130706433:{p}/red.png",
        f"http://0x7f000001:{p}/red.png",
        f"http://0177.0.0.1:{p}/red.png",
        f"http://127.1:{p}/red.png",
        f"http://127.0.0.2@127.0.0.1:{p}/red.png",
        f"http://allowed@127.0.0.1:{p}/red.png",
        f"http://127.0.0.2:{image_server.port}\\@127.0.0.1:{p}/red.png",
        f"http://127.0.0.1:{p}\\@127.0.0.2:{image_server.port}/red.png",
        f"http://127.0.0.1:{p}\\.127.0.0.2/red.png",
        f"http://[::]:{p}/red.png",
        f"http://127\uff0e0\uff0e0\uff0e1:{p}/red.png",  # full-width dots: 127.0.0.1 once IDNA-mapped
        f"http://\u2460\u2461\u2466.0.0.1:{p}/red.png",  # circled digits, likewise
        f"gopher://127.0.0.2:{image_server.port}/_GET%20/red.png",
        f"ftp://127.0.0.2:{image_server.port}/red.png",
        "file:///etc/passwd",
        "dict://127.0.0.1:11211/stats",
    ]


def test_forbidden_addresses_never_reach_the_canary(canary_server, image_server):
    async def run(loader):
        outcomes = []
        for url in forbidden_urls(canary_server, image_server):
            try:
                await loader.load(url)
                outcomes.append((url, "loaded"))
            except ImageURLForbiddenError as exc:
                outcomes.append((url, exc.code))
        return outcomes

    outcomes = asyncio.run(use_loader(run))
    assert all(code == "image_url_forbidden" for _, code in outcomes), outcomes
    assert canary_server.requests == []


def test_redirect_from_allowed_server_to_forbidden_address(canary_server, image_server):
    image_server.routes["/to-canary"] = redirect(f"http://127.0.0.1:{canary_server.port}/red.png")
    image_server.routes["/to-localhost"] = redirect(f"http://localhost:{canary_server.port}/red.png")
    image_server.routes["/to-metadata"] = redirect("http://169.254.169.254/latest/meta-data/")
    for path in ("/to-canary", "/to-localhost", "/to-metadata", "/redirect-ftp", "/redirect-file"):
        with pytest.raises(ImageURLForbiddenError):
            load_one(image_server.url(path))
    assert canary_server.requests == []


def test_a_malformed_redirect_location_is_refused(image_server):
    for i, location in enumerate(("http://[::1/", "http://]/", "//[x")):
        image_server.routes[f"/bad-redirect-{i}"] = redirect(location)
        with pytest.raises(ImageURLForbiddenError) as info:
            load_one(image_server.url(f"/bad-redirect-{i}"))
        assert "redirected to a malformed URL" in info.value.message


def test_a_redirect_location_in_raw_utf8_is_followed_percent_encoded(image_server):
    # Servers do send raw UTF-8 in Location; browsers percent-encode it and follow.
    image_server.routes["/caf%C3%A9.png"] = image_server.routes["/red.png"]
    image_server.routes["/x%E9.png"] = image_server.routes["/red.png"]
    image_server.routes["/to-utf8"] = raw("HTTP/1.0 302 Found\r\nLocation: /café.png\r\n"
                                          "Content-Length: 0\r\n\r\n".encode())
    image_server.routes["/to-latin1"] = raw(b"HTTP/1.0 302 Found\r\nLocation: /x\xe9.png\r\n"
                                            b"Content-Length: 0\r\n\r\n")
    assert load_one(image_server.url("/to-utf8")).original_size == (64, 48)
    assert load_one(image_server.url("/to-latin1")).original_size == (64, 48)
    assert [path for path, _ in image_server.requests[-4:]] == ["/to-utf8", "/caf%C3%A9.png",
                                                                "/to-latin1", "/x%E9.png"]


def test_a_failure_after_a_redirect_names_the_redirect(canary_server, image_server):
    image_server.routes["/to-canary-2"] = redirect(f"http://127.0.0.1:{canary_server.port}/red.png")
    with pytest.raises(ImageURLForbiddenError) as info:
        load_one(image_server.url("/to-canary-2"))
    assert info.value.message.startswith(
        f"The image URL redirected to http://127.0.0.1:{canary_server.port}/red.png, which failed: ")
    assert info.value.code == "image_url_forbidden"
    with pytest.raises(ImageFetchError) as info:
        load_one(image_server.url("/missing-redirect"))
    assert info.value.message == (f"The image URL redirected to {image_server.url('/does-not-exist')}, which "
                                  "failed: The image server answered HTTP 404; check the image URL.")
    with pytest.raises(ImageFetchError) as info:
        load_one(image_server.url("/nothing-here"))
    assert info.value.message == "The image server answered HTTP 404; check the image URL."
    # A target refused by its form alone, on the first hop and on a later one.
    image_server.routes["/to-userinfo"] = redirect(f"http://user@127.0.0.1:{canary_server.port}/red.png")
    image_server.routes["/to-to-userinfo"] = redirect("/to-userinfo")
    for path in ("/to-userinfo", "/to-to-userinfo"):
        with pytest.raises(ImageURLForbiddenError) as info:
            load_one(image_server.url(path))
        assert info.value.message == (f"The image URL redirected to http://user@127.0.0.1:{canary_server.port}"
                                      "/red.png, which failed: Image URLs with user information (user@host) "
                                      "are not allowed."), path
    assert canary_server.requests == []


def test_redirects_followed_within_the_hop_limit(image_server):
    assert load_one(image_server.url("/redirect-ok")).original_size == (64, 48)
    with pytest.raises(ImageFetchError) as info:
        load_one(image_server.url("/redirect-loop"))
    assert "redirected more than" in info.value.message
    with pytest.raises(ImageFetchError):
        load_one(image_server.url("/redirect-ok"), settings=make_settings(image_max_redirects=0))
    with pytest.raises(ImageFetchError) as info:
        load_one(image_server.url("/missing-redirect"))
    assert "HTTP 404" in info.value.message


def test_domain_allow_list_applies_to_live_fetches(image_server):
    resolver = static_resolver({"images.test": ["127.0.0.2"], "other.test": ["127.0.0.2"]})
    settings = make_settings(image_allowed_domains=["images.test"])
    assert load_one(f"http://images.test:{image_server.port}/red.png", settings=settings, resolver=resolver)
    with pytest.raises(ImageURLForbiddenError):
        load_one(f"http://other.test:{image_server.port}/red.png", settings=settings, resolver=resolver)
    with pytest.raises(ImageURLForbiddenError):
        load_one(image_server.url("/red.png"), settings=settings)  # an IP is not on the list
    with pytest.raises(ImageURLForbiddenError):
        load_one(f"http://images.test:{image_server.port}/red.png", resolver=resolver,
                 settings=make_settings(image_denied_domains=["images.test"]))


def test_without_the_allow_network_the_test_server_is_forbidden(image_server):
    with pytest.raises(ImageURLForbiddenError):
        load_one(image_server.url("/red.png"), settings=make_settings(image_allow_networks=[]))


def test_oversized_body_is_cut_off(image_server):
    for path in ("/big.bin", "/big-chunked.bin"):
        with pytest.raises(ImageTooLargeError) as info:
            load_one(image_server.url(path))
        assert info.value.code == "image_too_large"
        assert "195.3 KiB" in info.value.message


def test_compressed_transfer_is_refused(image_server):
    with pytest.raises(ImageFetchError):
        load_one(image_server.url("/gzip.png"))


def test_slow_drip_hits_the_total_deadline(image_server):
    started = time.monotonic()
    with pytest.raises(ImageFetchError) as info:
        load_one(image_server.url("/drip.png"), settings=make_settings(image_fetch_timeout=1.0))
    elapsed = time.monotonic() - started
    assert "longer than 1 s" in info.value.message
    assert elapsed < 15  # the drip alone would take 20 s (200 bytes, one per 0.1 s)


def test_unreachable_port_is_a_fetch_error(image_server):
    # A port on the allowed address with nothing listening (bound and closed again).
    state, httpd = start_server("127.0.0.2")
    httpd.shutdown()
    httpd.server_close()
    with pytest.raises(ImageFetchError) as info:
        load_one(state.url("/red.png"))
    assert "Could not connect" in info.value.message


# --- https: SNI and certificate verification use the host name, not the IP ------------

def _tls_material(tmp_path, name: str):
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "qwen-vl-serve test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)  # no IP SAN
            .sign(ca_key, hashes.SHA256()))
    cert_file, key_file, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return cert_file, key_file, ca_file


def test_https_uses_sni_and_verifies_the_certificate_for_the_name(tmp_path):
    cert_file, key_file, ca_file = _tls_material(tmp_path, "images.test")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert_file, key_file)
    sni_seen: list[str | None] = []
    server_ctx.sni_callback = lambda sock, name, ctx: sni_seen.append(name)
    state, httpd = start_server("127.0.0.2", wrap_socket=lambda s: server_ctx.wrap_socket(s, server_side=True),
                                keep_alive=True)
    state.routes["/red.png"] = static(samples.png(), "image/png")
    client_ctx = ssl.create_default_context(cafile=str(ca_file))
    resolver = static_resolver({"images.test": ["127.0.0.2"], "wrong.test": ["127.0.0.2"]})

    messages: list[str] = []

    async def run(loader):
        outcomes = []
        for name in ("images.test", "images.test", "wrong.test", "127.0.0.2"):
            try:
                loaded = await loader.load(f"https://{name}:{state.port}/red.png")
                outcomes.append(loaded.original_size)
            except ImageFetchError as exc:
                outcomes.append(exc.code)
                messages.append(exc.message)
        return outcomes

    try:
        # One loader, so one connection pool, for all four: the keep-alive connection
        # verified for images.test must not carry the request for wrong.test.
        transport = AiohttpTransport(max_connections=4, connect_timeout=1.0, read_timeout=3.0,
                                     ssl_context=client_ctx)
        outcomes = asyncio.run(use_loader(run, transport=transport, resolver=resolver,
                                          settings=make_settings(image_url_cache_ttl=0)))
        # The name the certificate does not cover and the bare IP (no IP SAN) both fail.
        assert outcomes == [(64, 48), (64, 48), "image_fetch_failed", "image_fetch_failed"]
        assert messages == [f"The image host '{host}' presented a TLS certificate that could not be verified for "
                            "that name (self-signed, expired or for another host)." for host in ("wrong.test",
                                                                                                "127.0.0.2")]
        assert sni_seen == ["images.test", "wrong.test", None]
        assert [headers["Host"] for _, headers in state.requests] == [f"images.test:{state.port}"] * 2
        assert state.peers[0] == state.peers[1]  # the second fetch reused the verified connection
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_connections_are_kept_alive_between_fetches():
    state, httpd = start_server("127.0.0.2", keep_alive=True)
    state.routes["/red.png"] = static(samples.png(), "image/png")
    state.routes["/blue.png"] = static(samples.png(32, 32, (0, 0, 255)), "image/png")

    async def run(loader):
        await loader.load(state.url("/red.png"))
        return await loader.load(state.url("/blue.png"))

    try:
        assert asyncio.run(use_loader(run)).original_size == (32, 32)
        assert [path for path, _ in state.requests] == ["/red.png", "/blue.png"]
        assert len(set(state.peers)) == 1, state.peers
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_broken_answers_are_fetch_errors(image_server):
    image_server.routes["/junk"] = raw(b"SPLAT 200 what\r\n\r\nnot http at all")
    image_server.routes["/cut-off"] = raw(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"\x89PNG" * 10)
    image_server.routes["/empty"] = raw(b"")
    image_server.routes["/huge-header"] = raw(b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 100_000 + b"\r\n\r\n")
    expected = {"/junk": "invalid answer", "/cut-off": "cut off", "/empty": "closed the connection",
                "/huge-header": "invalid answer"}
    for path, message in expected.items():
        with pytest.raises(ImageFetchError) as info:
            load_one(image_server.url(path))
        assert message in info.value.message, (path, info.value.message)
        assert "aiohttp" not in info.value.message and "127.0.0.2" not in info.value.message


def test_a_silent_server_hits_the_read_timeout(image_server):
    image_server.routes["/silent"] = silent(3.0)
    transport = AiohttpTransport(max_connections=2, connect_timeout=1.0, read_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(ImageFetchError) as info:
        load_one(image_server.url("/silent"), transport=transport, settings=make_settings(image_fetch_timeout=10.0))
    assert "did not answer in time" in info.value.message
    assert time.monotonic() - started < 2.5


def test_the_loader_keeps_no_cookies(image_server):
    def set_cookie(h):
        h.send_response(302)
        h.send_header("Set-Cookie", "session=secret; Path=/")
        h.send_header("Location", "/red.png")
        h.send_header("Content-Length", "0")
        h.end_headers()

    image_server.routes["/set-cookie"] = set_cookie
    load_one(image_server.url("/set-cookie"))
    path, headers = image_server.requests[-1]
    assert path == "/red.png" and "Cookie" not in headers


def test_endless_interim_responses_end_the_fetch_at_once(image_server):
    """A host answering with `100 Continue` over and over (aiohttp reads any number of them)
    kept the event loop busy parsing them, every client waiting, for as long as it kept on;
    the fetch deadline fired only then. After a few the exchange fails. A couple before the
    real answer are fine."""
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"

    def flood(h):
        deadline = time.monotonic() + 20
        try:
            while time.monotonic() < deadline:
                h.wfile.write(interim * 2000)
        except OSError:
            pass  # the fetcher hung up, as it should
        h.close_connection = True

    image_server.routes["/flood"] = flood
    image_server.routes["/two-then-image"] = raw(interim * 2 + b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"
                                                 % len(samples.png(8, 8)) + samples.png(8, 8))
    started = time.monotonic()
    with pytest.raises(ImageFetchError) as info:
        load_one(image_server.url("/flood"), settings=make_settings(image_fetch_timeout=15.0))
    assert time.monotonic() - started < 5
    assert "invalid answer" in info.value.message
    assert load_one(image_server.url("/two-then-image")).original_size == (8, 8)
