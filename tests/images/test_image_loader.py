"""`ImageLoader` end to end: concurrency and ordering, cancellation on the first failure,
caches, data: and file: URLs, pixel ceilings, metrics, and an event loop that keeps
ticking while large images decode."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import time

import pytest
from PIL import Image

from server.errors import (
    ImageDecodeError,
    ImageError,
    ImageFetchError,
    ImageTooLargeError,
    ImageURLForbiddenError,
    ServiceUnavailableError,
    TooManyImagesError,
)
from server.images import ImageLoader, check_image_count
from server.images.decode import DecodeLimits, decode_image
from server.images.family import FAMILIES, target_size
from server.metrics import Metrics

import image_samples as samples
from image_helpers import load_one, make_settings, use_loader
from support.http_server import raw, silent, static


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def sample(metrics: Metrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels or None) or 0.0


def slow(body: bytes, delay: float):
    route = static(body, "image/png")

    def handle(h):
        time.sleep(delay)
        route(h)

    return handle


def test_load_all_is_concurrent_and_keeps_order(image_server):
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9)]):
        image_server.routes[f"/slow{i}.png"] = slow(samples.png(8 + i, 8, color), 1.0)
    urls = [image_server.url(f"/slow{i}.png") for i in range(4)]

    async def run(loader):
        started = time.monotonic()
        images = await loader.load_all(urls)
        return images, time.monotonic() - started

    images, elapsed = asyncio.run(use_loader(run))
    assert [im.original_size[0] for im in images] == [8, 9, 10, 11]
    assert images[2].image.getpixel((4, 4)) == (0, 0, 255)
    assert elapsed < 2.5  # four 1 s fetches in parallel, not in sequence (4 s)


def test_first_failure_cancels_the_rest_and_names_the_image(image_server):
    urls = [image_server.url("/drip.png"), image_server.url("/drip.png"), "http://127.0.0.1/x.png"]
    params = [f"messages[0].content[{i}].image_url" for i in range(3)]
    metrics = Metrics()

    async def run(loader):
        started = time.monotonic()
        with pytest.raises(ImageURLForbiddenError) as info:
            await loader.load_all(urls, params=params)
        return info.value, time.monotonic() - started

    error, elapsed = asyncio.run(use_loader(run, metrics=metrics))
    assert error.param == "messages[0].content[2].image_url"
    assert elapsed < 1.0  # did not wait for the dripping downloads
    assert sample(metrics, "qwenvl_image_rejections_total", code="image_url_forbidden") == 1
    with pytest.raises(ValueError):
        asyncio.run(use_loader(lambda loader: loader.load_all(urls, params=params[:1])))
    assert asyncio.run(use_loader(lambda loader: loader.load_all([]))) == []


class UnhashableText(str):
    """A URL whose hashing fails the test: the loader must not hash a data: URL's whole text
    on the event loop (megabytes for a photo)."""

    def __hash__(self):
        raise AssertionError("the URL's whole text was hashed")


def test_data_urls_are_told_apart_and_deduplicated_without_hashing_their_text():
    # Two different pictures whose data: URLs have the same length, start and end, and a
    # third that repeats the first: one load for the first and third.
    def bmp(centre: tuple[int, int, int]) -> bytes:  # uncompressed: the bytes differ mid-file only
        picture = Image.new("RGB", (40, 30), (10, 20, 30))
        picture.putpixel((20, 15), centre)
        out = io.BytesIO()
        picture.save(out, "BMP")
        return out.getvalue()

    ua, ub = data_url(bmp((10, 20, 30)), "image/bmp"), data_url(bmp((200, 0, 0)), "image/bmp")
    assert len(ua) == len(ub) and ua[:64] == ub[:64] and ua[-64:] == ub[-64:] and ua != ub
    urls = [UnhashableText(ua), UnhashableText(ub), UnhashableText(ua)]
    images = asyncio.run(use_loader(lambda loader: loader.load_all(urls, details=[None, None, None])))
    assert images[0] is images[2] and images[0] is not images[1]
    assert images[0].image.getpixel((20, 15)) == (10, 20, 30) and images[1].image.getpixel((20, 15)) == (200, 0, 0)
    # the same URL with another detail is its own load
    low = asyncio.run(use_loader(lambda loader: loader.load_all(urls[:1] * 2, details=[None, "low"])))
    assert low[0] is not low[1]


def test_the_same_picture_twice_in_one_request_is_fetched_once(image_server):
    image_server.routes["/twice.png"] = slow(samples.png(12, 8, (1, 2, 3)), 0.2)
    image_server.routes["/other.png"] = static(samples.png(5, 5, (0, 0, 0)), "image/png")
    twice, other = image_server.url("/twice.png"), image_server.url("/other.png")
    images = asyncio.run(use_loader(lambda loader: loader.load_all(
        [twice, other, twice, twice], details=["auto", None, "auto", "low"])))
    assert [im.original_size for im in images] == [(12, 8), (5, 5), (12, 8), (12, 8)]
    assert images[0] is images[2]
    fetched = [path for path, _ in image_server.requests]
    # once: the "auto" copies are one load, the "low" one shares its download
    assert fetched.count("/twice.png") == 1 and fetched.count("/other.png") == 1


def test_the_wait_for_a_fetch_slot_counts_against_the_fetch_deadline(image_server):
    """Slow hosts holding every fetch slot delay another image by at most the fetch
    timeout, and the error says how much of it went waiting for a slot."""
    image_server.routes["/hang1.png"] = silent(3.0)
    image_server.routes["/hang2.png"] = silent(3.0)
    image_server.routes["/fast.png"] = static(samples.png(4, 4, (9, 9, 9)), "image/png")
    settings = make_settings(image_fetch_concurrency=1, image_fetch_timeout=1.0)

    async def run(loader):
        first = asyncio.create_task(loader.load(image_server.url("/hang1.png")))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        with pytest.raises(ImageFetchError) as queued:
            await loader.load(image_server.url("/hang2.png"))
        elapsed = time.monotonic() - started
        with pytest.raises(ImageFetchError):
            await first
        fresh = await loader.load(image_server.url("/fast.png"))  # the slot is free again
        return queued.value, elapsed, fresh

    queued, elapsed, fresh = asyncio.run(use_loader(run, settings=settings))
    assert elapsed < 1.6  # not 0.7 s of queueing plus a whole second of its own (1.7 s)
    # (0.7 s give or take the event loop's timer lateness on a busy machine)
    assert re.search(r"longer than 1 s \(0\.[6-8] s of it waiting for a free fetch slot\)", queued.message)
    assert fresh.original_size == (4, 4)


def test_no_free_fetch_slot_in_time_is_a_503():
    from server.images.fetch import FetchLimits, HttpFetcher
    from server.images.policy import AddressPolicy, DomainPolicy
    from server.images.urls import parse_image_url

    fetcher = HttpFetcher(transport=None, addresses=AddressPolicy([]), domains=DomainPolicy([], []),
                          resolver=None, limits=FetchLimits(max_bytes=1, total_timeout=0.2, connect_timeout=0.1,
                                                            max_redirects=0),
                          concurrency=1)

    async def run():
        async with fetcher._semaphore:  # every slot held (by downloads that never end)
            with pytest.raises(ServiceUnavailableError) as busy:
                await fetcher.fetch(parse_image_url("http://images.example/a.png"))
        return busy.value

    busy = asyncio.run(run())
    assert busy.status == 503 and busy.code == "image_fetch_busy" and busy.headers == {"Retry-After": "1"}
    assert "busy for 0.2 s" in busy.message


def test_a_download_is_shared_by_concurrent_loads_and_ends_when_they_all_leave(image_server):
    image_server.routes["/popular.png"] = slow(samples.png(6, 6, (5, 5, 5)), 0.5)
    image_server.routes["/abandoned.png"] = silent(2.0)
    url = image_server.url("/popular.png")

    async def run(loader):
        both = await asyncio.gather(loader.load(url, param="a"), loader.load(url, detail="low", param="b"))
        waiter = asyncio.create_task(loader.load(image_server.url("/abandoned.png")))
        await asyncio.sleep(0.2)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        await asyncio.sleep(0)
        return both, dict(loader._downloads)

    both, left = asyncio.run(use_loader(run))
    assert [im.original_size for im in both] == [(6, 6), (6, 6)]
    assert [p for p, _ in image_server.requests].count("/popular.png") == 1
    assert left == {}  # the abandoned download was cancelled, nothing is kept


def test_a_shared_failed_download_names_each_loads_own_image(image_server):
    image_server.routes["/gone.png"] = raw(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    url = image_server.url("/gone.png")

    async def run(loader):
        return await asyncio.gather(loader.load(url, param="messages[0]"), loader.load(url, param="messages[1]"),
                                    return_exceptions=True)

    errors = asyncio.run(use_loader(run))
    assert [e.param for e in errors] == ["messages[0]", "messages[1]"]
    assert all(isinstance(e, ImageFetchError) and "HTTP 404" in e.message for e in errors)


def test_url_and_content_caches(image_server):
    image_server.routes["/cache-a.png"] = static(samples.png(30, 20, (1, 2, 3)), "image/png")
    image_server.routes["/cache-b.png"] = static(samples.png(30, 20, (1, 2, 3)), "image/png")
    metrics = Metrics()

    async def run(loader):
        first = await loader.load(image_server.url("/cache-a.png"))
        again = await loader.load(image_server.url("/cache-a.png"))
        same_bytes = await loader.load(image_server.url("/cache-b.png"))
        smaller = await loader.load(image_server.url("/cache-a.png"), max_pixels=3136)
        return first, again, same_bytes, smaller

    before = len(image_server.requests)
    first, again, same_bytes, smaller = asyncio.run(use_loader(run, metrics=metrics))
    assert again is first and same_bytes is first
    assert smaller is not first and first.digest == smaller.digest
    fetched = [p for p, _ in image_server.requests[before:]]
    assert fetched == ["/cache-a.png", "/cache-b.png", "/cache-a.png"]  # the 2nd load never fetched
    assert sample(metrics, "qwenvl_image_cache_total", cache="url", result="hit") == 1
    assert sample(metrics, "qwenvl_image_cache_total", cache="url", result="miss") == 3
    assert sample(metrics, "qwenvl_image_cache_total", cache="content", result="hit") == 1
    assert sample(metrics, "qwenvl_image_cache_total", cache="content", result="miss") == 2
    assert sample(metrics, "qwenvl_image_fetch_seconds_count") == 3
    assert sample(metrics, "qwenvl_image_decode_seconds_count") == 2
    assert sample(metrics, "qwenvl_image_bytes_count") == 3


def test_cache_can_be_disabled(image_server):
    settings = make_settings(image_cache_size=0)

    async def run(loader):
        return [await loader.load(image_server.url("/blue.png")) for _ in range(2)]

    a, b = asyncio.run(use_loader(run, settings=settings))
    assert a is not b and a.digest == b.digest


def test_a_data_url_sent_again_is_found_without_decoding_its_base64(monkeypatch):
    metrics = Metrics()
    picture = samples.noise_jpeg(200, 150)
    url = data_url(picture, "image/jpeg")
    wrapped = "data:image/jpeg;base64," + base64.encodebytes(picture).decode()  # the same bytes, in lines
    decoded: list[int] = []
    real_b64decode = base64.b64decode
    monkeypatch.setattr(base64, "b64decode", lambda s, **kw: decoded.append(len(s)) or real_b64decode(s, **kw))

    async def run(loader):
        first = await loader.load(url)
        again = await loader.load(url)
        decodes_after_two = len(decoded)
        same_bytes = await loader.load(wrapped)
        smaller = await loader.load(url, max_pixels=10_000)  # the text is known, these pixels are not
        return first, again, same_bytes, smaller, decodes_after_two

    first, again, same_bytes, smaller, decodes_after_two = asyncio.run(use_loader(run, metrics=metrics))
    assert again is first and same_bytes is first
    assert smaller is not first and smaller.digest == first.digest and smaller.image.size != first.image.size
    assert decodes_after_two == 1  # the second load decoded no base64
    assert sample(metrics, "qwenvl_image_cache_total", cache="data_url", result="hit") == 1
    assert sample(metrics, "qwenvl_image_cache_total", cache="data_url", result="miss") == 3
    assert sample(metrics, "qwenvl_image_cache_total", cache="content", result="hit") == 1  # the lines
    assert sample(metrics, "qwenvl_image_cache_total", cache="content", result="miss") == 2
    assert sample(metrics, "qwenvl_image_decode_seconds_count") == 2


def test_a_refused_data_url_is_refused_again():
    """Only pictures that loaded are remembered: the same bad payload fails each time."""
    settings = make_settings(image_max_bytes=1000)
    url = data_url(samples.noise_jpeg(200, 200), "image/jpeg")

    async def run(loader):
        errors = []
        for _ in range(2):
            with pytest.raises(ImageTooLargeError) as info:
                await loader.load(url)
            errors.append(info.value)
        return errors

    assert len(asyncio.run(use_loader(run, settings=settings))) == 2


def test_data_urls():
    loaded = load_one(data_url(samples.png(5, 7)))
    assert loaded.original_size == (5, 7) and loaded.image.size == (5, 7)
    big = load_one(data_url(samples.noise_jpeg(900, 600), "image/jpeg"), settings=make_settings(image_max_bytes=10**6))
    assert big.original_size == (900, 600)
    cases = [
        (data_url(os.urandom(300_000)), ImageTooLargeError),  # refused from the length alone
        ("data:image/png;base64,iVBORw0KGgo!!!!", ImageDecodeError),
        ("data:image/png;base64,iVBO Rw0K", ImageDecodeError),
        ("data:image/png;base64,iVBORw0KGgoA", ImageDecodeError),  # bad padding
        ("data:image/png;base64,", ImageDecodeError),
        (data_url(samples.SVG, "image/svg+xml"), ImageDecodeError),
        (data_url(samples.HTML), ImageDecodeError),
        (data_url(samples.png(), "text/html"), ImageError),
    ]
    for url, error in cases:
        with pytest.raises(error):
            load_one(url)


def test_a_data_url_without_an_image_type_is_read_for_what_it_holds():
    """A file of unknown type becomes `data:application/octet-stream;base64,...`, and some
    clients leave the type out (`data:;base64,...`): vLLM's server decodes both (they were
    a 400 here). The decoder still refuses what is not a picture."""
    for mime in ("application/octet-stream", "", "Application/Octet-Stream"):
        assert load_one(data_url(samples.png(6, 4), mime)).original_size == (6, 4), mime
        with pytest.raises(ImageDecodeError):
            load_one(data_url(samples.HTML, mime))
    for mime in ("text/plain", "application/json", "application/pdf"):
        with pytest.raises(ImageError, match="media type must be image"):
            load_one(data_url(samples.png(), mime))


def test_base64_as_common_tools_write_it_is_read():
    """The `base64` tool's 76-character lines, the URL-safe alphabet, padding left off and
    percent-escaped + and / were refused (image_decode_failed); clients send all of them."""
    import base64

    raw = samples.png(9, 5)
    standard = base64.b64encode(raw).decode()
    for payload in (base64.encodebytes(raw).decode(), base64.encodebytes(raw).decode().replace("\n", "\r\n"),
                    base64.urlsafe_b64encode(raw).decode(), standard.rstrip("="),
                    standard.replace("+", "%2B").replace("/", "%2F"), " " + standard + "\n"):
        assert load_one("data:image/png;base64," + payload).original_size == (9, 5), payload
    for payload in ("iVBORw0KGgo!!!!", "iVBORw0KG", "iVB=ORw0"):
        with pytest.raises(ImageDecodeError) as info:
            load_one("data:image/png;base64," + payload)
        assert "not valid base64" in info.value.message or "could not be decoded" in info.value.message


def test_the_size_limit_counts_the_bytes_not_the_lines_or_escapes_around_them():
    """A payload under the limit was refused as too large when wrapped in MIME lines or
    percent-escaped: the limit was checked against the encoded length, newlines and `%2B`s
    included."""
    from server.images.local import decode_data_url
    from server.images.urls import parse_image_url

    def decode(payload: str, limit: int) -> bytes:
        return asyncio.run(decode_data_url(parse_image_url("data:image/png;base64," + payload), limit))

    raw = os.urandom(990)
    standard = base64.b64encode(raw).decode()
    escaped = standard.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")
    for payload in (base64.encodebytes(raw).decode(), base64.encodebytes(raw).decode().replace("\n", "\r\n"),
                    escaped, " " + standard + "\n"):
        assert decode(payload, 1000) == raw
        with pytest.raises(ImageTooLargeError):  # one byte less than the payload holds
            decode(payload, 989)
    assert decode(standard, 990) == raw
    with pytest.raises(ImageTooLargeError):
        decode(standard, 989)


def test_file_urls(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    (media / "red image.png").write_bytes(samples.png())
    (tmp_path / "secret.png").write_bytes(samples.png())
    (media / "escape.png").symlink_to(tmp_path / "secret.png")
    (media / "big.png").write_bytes(b"\x00" * 300_000)
    settings = make_settings(allowed_local_media_path=media)
    assert load_one(f"file://{media}/red%20image.png", settings=settings).original_size == (64, 48)
    for url in (f"file://{tmp_path}/secret.png", f"file://{media}/../secret.png", f"file://{media}/escape.png",
                f"file://{media}/%2e%2e/secret.png", "file:///etc/passwd"):
        with pytest.raises(ImageURLForbiddenError):
            load_one(url, settings=settings)
    with pytest.raises(ImageFetchError):
        load_one(f"file://{media}/missing.png", settings=settings)
    with pytest.raises(ImageFetchError):
        load_one(f"file://{media}", settings=settings)  # a directory
    with pytest.raises(ImageTooLargeError):
        load_one(f"file://{media}/big.png", settings=settings)
    with pytest.raises(ImageURLForbiddenError) as info:
        load_one(f"file://{media}/red%20image.png")  # no media directory configured
    assert "--allowed-local-media-path" in str(info.value) and str(media) not in str(info.value)


def test_pixel_ceiling_from_settings_and_request():
    url = data_url(samples.noise_jpeg(1600, 1200), "image/jpeg")
    settings = make_settings(image_max_pixels=500_000, image_max_bytes=10**6)
    capped = load_one(url, settings=settings)
    assert capped.original_size == (1600, 1200)
    assert capped.image.width * capped.image.height <= 500_000
    lowered = load_one(url, settings=settings, max_pixels=100_000)
    assert lowered.image.width * lowered.image.height <= 100_000
    raised = load_one(url, settings=settings, max_pixels=10_000_000)
    assert raised.image.size == capped.image.size  # a request cannot raise the ceiling
    with pytest.raises(ImageError):
        load_one(url, settings=settings, max_pixels=0)


def test_without_a_configured_ceiling_the_engine_processors_bound_applies():
    """A picture above the bound would only be shrunk again by the engine's processor."""
    url = data_url(samples.noise_jpeg(1600, 1200), "image/jpeg")
    settings = make_settings(image_max_bytes=10**6)
    bounded = load_one(url, settings=settings, model_max_pixels=200_704)
    assert bounded.image.width * bounded.image.height <= 200_704
    assert bounded.image.size == target_size(FAMILIES["qwen2-vl"], 1600, 1200, 200_704)
    unbounded = load_one(url, settings=settings)  # no bound known: the family's default
    assert unbounded.image.size == target_size(FAMILIES["qwen2-vl"], 1600, 1200,
                                               FAMILIES["qwen2-vl"].default_max_pixels)
    assert unbounded.image.width * unbounded.image.height > 4 * 200_704
    configured = load_one(url, settings=make_settings(image_max_bytes=10**6, image_max_pixels=500_000),
                          model_max_pixels=200_704)  # --image-max-pixels wins (it raises the bound)
    assert configured.image.size == target_size(FAMILIES["qwen2-vl"], 1600, 1200, 500_000)
    fixed = load_one(url, settings=settings, family="qwen-vl", model_max_pixels=200_704)
    assert fixed.image.size == (448, 448)  # Qwen-VL's square, whatever the processor's bound


def test_low_detail_loads_a_smaller_picture_cached_apart():
    url = data_url(samples.noise_jpeg(1600, 1200), "image/jpeg")
    settings = make_settings(image_max_bytes=10**6)

    async def run(loader):
        return [await loader.load(url, detail=d) for d in ("high", "low", "auto", "low")]

    high, low, auto, low_again = asyncio.run(use_loader(run, settings=settings))
    assert high.image.size == (1600, 1200) and auto is high
    assert low.image.width * low.image.height <= 448 * 448
    assert low.image.width / low.image.height == pytest.approx(4 / 3, rel=0.05)
    assert low.original_size == (1600, 1200) and low.pixels_id != high.pixels_id
    assert low_again is low
    # Qwen-VL stretches every picture to 448x448 itself: the image goes through unchanged.
    assert load_one(url, settings=settings, family="qwen-vl", detail="low").image.size == (448, 448)


def test_pixels_id_names_the_decoded_pixels():
    """Equal ids only for equal pixels: the engine uses the id as the image's cache key."""
    jpeg = samples.noise_jpeg(1600, 1200)
    settings = make_settings(image_max_pixels=500_000, image_max_bytes=10**6)
    first = load_one(data_url(jpeg, "image/jpeg"), settings=settings)
    again = load_one(data_url(jpeg, "image/jpeg"), settings=settings)
    smaller = load_one(data_url(jpeg, "image/jpeg"), settings=settings, max_pixels=100_000)
    other = load_one(data_url(samples.noise_jpeg(1600, 1201), "image/jpeg"), settings=settings)
    assert first.pixels_id and first.pixels_id == again.pixels_id
    assert first.image.tobytes() == again.image.tobytes()
    assert smaller.image.size != first.image.size and smaller.pixels_id != first.pixels_id
    assert other.pixels_id != first.pixels_id


HOSTILE = {
    "/bomb.png": "image_too_large",
    "/header-bomb.png": "image_too_large",
    "/truncated.jpg": "image_decode_failed",
    "/truncated.png": "image_decode_failed",
    "/random.png": "image_decode_failed",
    "/page.png": "image_decode_failed",
    "/page.html": "image_decode_failed",
    "/image.svg": "image_decode_failed",
    "/frames.gif": "image_too_large",
    "/1x10000.png": "invalid_image",
    "/big.bin": "image_too_large",
}


def test_hostile_images_over_http_then_a_normal_image_still_loads(image_server):
    metrics = Metrics()

    async def run(loader):
        codes = {}
        for path in HOSTILE:
            try:
                await loader.load(image_server.url(path))
                codes[path] = "loaded"
            except ImageError as exc:
                codes[path] = exc.code
        converted = {path: await loader.load(image_server.url(path))
                     for path in ("/cmyk.jpg", "/16bit.png", "/rotated.jpg", "/1x1.png")}
        normal = await loader.load(image_server.url("/photo.jpg"))
        return codes, converted, normal

    settings = make_settings(image_max_bytes=200_000)
    codes, converted, normal = asyncio.run(use_loader(run, settings=settings, metrics=metrics))
    assert codes == HOSTILE
    assert all(item.image.mode == "RGB" for item in converted.values())
    assert converted["/16bit.png"].image.getpixel((0, 0)) == (255, 0, 128)
    assert converted["/rotated.jpg"].original_size == (20, 40)
    assert converted["/1x1.png"].image.size == (1, 1)
    assert normal.original_size == (640, 480)
    assert sample(metrics, "qwenvl_image_rejections_total", code="image_decode_failed") == 6


def test_check_image_count():
    check_image_count(4, 4)
    with pytest.raises(TooManyImagesError) as info:
        check_image_count(5, 4)
    assert info.value.code == "too_many_images" and "at most 4" in info.value.message
    metrics = Metrics()
    loader = ImageLoader(make_settings(limit_mm_per_prompt=2), metrics, family="qwen2-vl")
    with pytest.raises(TooManyImagesError):
        loader.check_count(3)
    asyncio.run(loader.aclose())
    assert sample(metrics, "qwenvl_image_rejections_total", code="too_many_images") == 1


def test_unknown_family_is_a_configuration_error():
    with pytest.raises(ValueError):
        ImageLoader(make_settings(), Metrics(), family="llava")


def test_event_loop_keeps_ticking_while_large_images_decode():
    """Six 12-megapixel JPEGs decoded at full size at once: the loop must keep ticking,
    because pixel work runs in the worker pool. Were it on the loop, each decode would
    stall it for a full decode time (measured first, as the yardstick), so nearly all of
    the elapsed time would be spent in stalls. The bound is on that share, not on the
    single longest gap, so a busy shared machine descheduling the process now and then
    does not fail the test."""
    jpeg = samples.noise_jpeg(4000, 3000)
    urls = [data_url(jpeg + bytes([i]), "image/jpeg") for i in range(6)]  # distinct digests
    settings = make_settings(image_max_bytes=20 * 2**20, image_decode_workers=2)
    limits = DecodeLimits(settings.image_max_input_pixels, settings.image_max_frames)
    timings = []
    for _ in range(2):
        started = time.perf_counter()
        decode_image(jpeg, limits=limits, family=FAMILIES["qwen2-vl"], max_pixels=None)
        timings.append(time.perf_counter() - started)
    stall = max(0.05, min(timings) / 2)

    async def run(loader):
        gaps: list[float] = []
        done = asyncio.Event()

        async def ticker():
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0.02)
        started = time.perf_counter()
        images = await loader.load_all(urls)
        elapsed = time.perf_counter() - started
        done.set()
        await tick
        return images, gaps, elapsed

    images, gaps, elapsed = asyncio.run(use_loader(run, settings=settings))
    assert [im.image.size for im in images] == [(4000, 3000)] * 6
    stalled = sum(gap for gap in gaps if gap > stall)
    assert len(gaps) > 10
    assert stalled < 0.3 * elapsed, (stalled, elapsed, stall, sorted(gaps)[-5:])


def test_a_picture_decoding_is_decoded_once_for_every_load_that_wants_it(monkeypatch):
    """Loads of one picture while it decodes (before the content cache has it) wait for that
    decode; a load that gives up leaves it to the others; a refused picture names each
    load's own image."""
    import server.images.loader as loader_module

    decodes = []

    def slow_decode(data, **kwargs):
        decodes.append(len(data))
        time.sleep(0.3)
        return decode_image(data, **kwargs)

    monkeypatch.setattr(loader_module, "decode_image", slow_decode)
    picture = data_url(samples.png(9, 9, (1, 2, 3)))
    broken = data_url(samples.png(9, 9)[:-30])

    async def run(loader):
        first = asyncio.create_task(loader.load(picture))
        await asyncio.sleep(0.05)
        others = [asyncio.create_task(loader.load(picture)) for _ in range(5)]
        await asyncio.sleep(0.05)
        first.cancel()  # the load that started the decode leaves
        loaded = await asyncio.gather(*others)
        errors = await asyncio.gather(*(loader.load(broken, param=f"p{i}") for i in range(3)),
                                      return_exceptions=True)
        return loaded, errors, dict(loader._decodes)

    loaded, errors, left = asyncio.run(use_loader(run))
    assert all(im.original_size == (9, 9) and im is loaded[0] for im in loaded)
    assert [e.param for e in errors] == ["p0", "p1", "p2"]
    assert all(isinstance(e, ImageDecodeError) for e in errors)
    assert len(decodes) == 2  # the picture once, the broken one once
    assert left == {}


def test_decodes_every_load_left_never_run(monkeypatch):
    """A request whose last picture fails at once gets its 400 and frees its slot: the
    decodes of its other pictures, still queued for a worker, must not run then (a stream
    of such requests kept every worker busy for nobody, and real pictures waited behind)."""
    import threading

    import server.images.loader as loader_module

    started, release = [], threading.Event()

    def blocking_decode(data, **kwargs):
        started.append(len(data))
        release.wait(10)
        return decode_image(data, **kwargs)

    monkeypatch.setattr(loader_module, "decode_image", blocking_decode)
    pictures = [data_url(samples.png(9 + i, 9, (i, 2, 3))) for i in range(4)]
    bad = "data:image/png;base64,not base64!"

    async def run(loader):
        # one worker: the first picture holds it, the next three queue behind
        with pytest.raises(ImageError):
            await loader.load_all([*pictures, bad])
        await asyncio.sleep(0.2)
        left = dict(loader._decodes)
        release.set()
        after = await loader.load(data_url(samples.png(5, 5)))
        return left, after

    left, after = asyncio.run(use_loader(run, settings=make_settings(image_decode_workers=1)))
    assert left == {}
    assert after.original_size == (5, 5)
    assert len(started) == 2  # the one a worker had begun, and the picture loaded after


def test_the_decode_workers_take_each_requests_pictures_in_turn(monkeypatch):
    """One worker; request A's four pictures come first, request B's one after A's first has
    begun: B's decodes second, not fifth (first come, first served, a 32x32 picture waited
    14 s behind large ones). The wait for a worker is a metric of its own, apart from the
    decode time."""
    import threading

    import server.images.loader as loader_module

    order, gate = [], threading.Semaphore(0)

    def gated_decode(data, **kwargs):
        image = decode_image(data, **kwargs)
        order.append(image[1])
        gate.acquire(timeout=10)
        return image

    monkeypatch.setattr(loader_module, "decode_image", gated_decode)
    a = [data_url(samples.png(10 + i, 10, (i, 2, 3))) for i in range(4)]
    b = data_url(samples.png(5, 5))
    metrics = Metrics()

    async def run(loader):
        first = asyncio.create_task(loader.load_all(a))
        while not order:
            await asyncio.sleep(0.01)
        second = asyncio.create_task(loader.load_all([b]))
        await asyncio.sleep(0.1)  # (both requests' pictures queued)
        for _ in range(5):
            gate.release()
        return await first, await second

    first, second = asyncio.run(use_loader(run, settings=make_settings(image_decode_workers=1), metrics=metrics))
    assert [im.original_size for im in first] == [(10, 10), (11, 10), (12, 10), (13, 10)]
    assert order == [(10, 10), (5, 5), (11, 10), (12, 10), (13, 10)]
    assert sample(metrics, "qwenvl_image_decode_wait_seconds_count") == 5
    # (the decodes themselves are fast; the waits behind the gate are not)
    assert sample(metrics, "qwenvl_image_decode_wait_seconds_sum") > sample(metrics, "qwenvl_image_decode_seconds_sum")
