"""`ImageLoader`: image URL in, model-ready RGB picture out.

It ties the pieces together: parse the URL once (`urls`), get the bytes (`fetch` for
http(s) under the address/domain policies, `local` for data: and file:), hash them, look
them up in the caches, and decode in a bounded thread pool (`decode`) so the event loop
never runs pixel work. Every failure is an `ImageError` subclass (a 400 with a specific
code) and is counted in `image_rejections{code}`.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import hashlib
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from PIL import Image

from ..errors import ImageError
from ..metrics import Metrics
from ..settings import Settings
from .cache import DEFAULT_CACHE_BYTES, ContentCache, URLCache
from .decode import DecodeLimits, decode_image, prepare
from .fair_pool import FairPool, owned_by
from .family import effective_max_pixels, family_spec
from .fetch import FetchLimits, HttpFetcher, build_transport
from .limits import check_image_count
from .local import LocalMediaReader, decode_data_url
from .policy import AddressPolicy, DomainPolicy
from .resolve import Resolver, SystemResolver
from .transport import Transport
from .urls import DataURL, FileURL, HttpURL, ImageURL, parse_image_url

T = TypeVar("T")

#: Hashing of payloads above this size moves to the worker pool (hashlib releases the GIL).
OFFLOAD_BYTES = 256 * 1024
#: URL cache entries per content cache entry (URL entries are small).
URL_ENTRIES_PER_IMAGE = 4


@dataclass(frozen=True, eq=False)
class LoadedImage:
    """A decoded image. `image` is RGB and fully loaded, possibly resized to the pixel
    ceiling; it may be shared through the cache, so callers must not modify it.
    `original_size` is (width, height) after EXIF orientation, before resizing; `digest`
    is the SHA-256 of the encoded bytes. `pixels_id` names the decoded pixels: equal ids
    mean equal images (same bytes, same pixel ceiling), so the engine may use it as the
    image's cache key instead of hashing the pixels again."""

    image: Image.Image
    original_size: tuple[int, int]
    digest: str
    pixels_id: str = ""


@dataclass(eq=False)
class _Shared:
    """One piece of work in flight (a download, a decode), and how many loads wait for it."""

    task: asyncio.Future
    waiters: int = 0


class ImageLoader:
    """Loads image URLs for one model family. Create one per app; close with `aclose`."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        family: str,
        model_max_pixels: int | None = None,
        model_square_side: int | None = None,
        transport: Transport | None = None,
        resolver: Resolver | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        """`family`: qwen-vl, qwen2-vl, qwen2.5-vl or qwen3-vl. `transport`: the HTTP client
        for image URLs (must connect to the address it is given, never through a proxy; the
        loader closes it), else an aiohttp one is created.
        `model_max_pixels`: the engine's image processor's pixel bound (the checkpoint's
        `max_pixels`, or what --image-max-pixels raised it to), the ceiling when the
        settings set none. `model_square_side`: the side of the square a family that
        stretches pictures to one uses (Qwen-VL: `visual.image_size`; default the family's).
        `resolver`: host name resolution (default: the system resolver in a thread).
        Raises ValueError for an unknown family or a malformed --image-allow-networks."""
        self.settings = settings
        self.family = family_spec(family, model_square_side)
        # The server's ceiling: --image-max-pixels, else the engine processor's own bound
        # (a picture above it would be shrunk again there), else the family's default.
        self._ceiling = settings.image_max_pixels or (model_max_pixels if self.family.factor else None)
        self._metrics = metrics
        limits = FetchLimits(
            max_bytes=settings.image_max_bytes,
            total_timeout=settings.image_fetch_timeout,
            connect_timeout=settings.image_connect_timeout,
            max_redirects=settings.image_max_redirects,
        )
        self._transport = transport or build_transport(limits, settings.image_fetch_concurrency)
        # (as many lookups in flight as fetches, at most 16 threads: each holds one while it waits)
        self._system_resolver = SystemResolver(min(settings.image_fetch_concurrency, 16))
        self._fetcher = HttpFetcher(
            self._transport,
            addresses=AddressPolicy(settings.image_allow_networks),
            domains=DomainPolicy(settings.image_allowed_domains, settings.image_denied_domains),
            resolver=resolver or self._system_resolver,
            limits=limits,
            concurrency=settings.image_fetch_concurrency,
        )
        self._local = LocalMediaReader(settings.allowed_local_media_path, settings.image_max_bytes)
        self._decode_limits = DecodeLimits(settings.image_max_input_pixels, settings.image_max_frames)
        prepare(settings.image_max_input_pixels)
        self._pool = FairPool(settings.image_decode_workers, thread_name_prefix="image-decode")
        self._content: ContentCache[LoadedImage] = ContentCache(settings.image_cache_size, cache_bytes)
        self._urls = URLCache(settings.image_url_cache_ttl, settings.image_cache_size * URL_ENTRIES_PER_IMAGE)
        # (what a data: URL holds never changes: its entries need no time to live)
        self._data_urls = URLCache(math.inf, settings.image_cache_size * URL_ENTRIES_PER_IMAGE)
        self._downloads: dict[str, _Shared] = {}
        self._decodes: dict[tuple[str, int | None], _Shared] = {}

    def check_count(self, count: int, *, param: str | None = "messages") -> None:
        """Raise TooManyImagesError when `count` exceeds `settings.limit_mm_per_prompt`."""
        try:
            check_image_count(count, self.settings.limit_mm_per_prompt, param=param)
        except ImageError as exc:
            self._metrics.image_rejections.labels(code=exc.code).inc()
            raise

    async def load(
        self, url: str, *, max_pixels: int | None = None, detail: str | None = None, param: str | None = None
    ) -> LoadedImage:
        """Fetch (or take from the cache) and decode one image.

        `max_pixels` may lower the server's pixel ceiling, never raise it; so may `detail`
        ("low": `FamilySpec.low_detail_max_pixels`; "high", "original", "auto", None: no change). `param` is set
        as the error's `param` (e.g. "messages[1].content[2].image_url"). Raises only
        ImageError subclasses: ImageURLForbiddenError, ImageFetchError, ImageTooLargeError,
        ImageDecodeError, or ImageError (code invalid_image) for malformed URLs and shapes
        the model cannot take; and ServiceUnavailableError when every fetch slot stayed
        busy (`HttpFetcher.fetch`)."""
        try:
            return await self._load(url, max_pixels, detail)
        except ImageError as exc:
            if exc.param is None:
                exc.param = param
            self._metrics.image_rejections.labels(code=exc.code).inc()
            raise

    async def load_all(
        self,
        urls: Sequence[str],
        *,
        max_pixels: int | None = None,
        details: Sequence[str | None] | None = None,
        params: Sequence[str] | None = None,
    ) -> list[LoadedImage]:
        """Load `urls` concurrently; results keep the order of `urls`. `details` (one per
        URL) as `detail` of `load`. On the first failure the other loads are cancelled and
        that failure is raised (its `param` taken from `params`, one per URL)."""
        if params is not None and len(params) != len(urls):
            raise ValueError("params must have one entry per URL")
        if details is not None and len(details) != len(urls):
            raise ValueError("details must have one entry per URL")
        if not urls:
            return []
        # The same picture twice in one request (same URL, same detail) is loaded once. URLs
        # are grouped by a cheap fingerprint and then compared, never hashed whole: a data:
        # URL is megabytes of text, and hashing it held the event loop 0.3 ms per MB.
        candidates: dict[tuple[int, str, str, str | None], list[int]] = {}
        first: list[int] = []  # the index of each slot's URL
        slots: list[int] = []  # the slot of each URL
        for i, url in enumerate(urls):
            same = candidates.setdefault((len(url), url[:64], url[-64:], details[i] if details else None), [])
            slot = next((s for s in same if urls[first[s]] == url), None)
            if slot is None:
                slot = len(first)
                first.append(i)
                same.append(slot)
            slots.append(slot)
        with owned_by(object()):  # (the decode workers take each request's pictures in turn)
            tasks = [
                asyncio.create_task(self.load(urls[i], max_pixels=max_pixels, detail=details[i] if details else None,
                                              param=params[i] if params else None))
                for i in first
            ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failed = [t for t in tasks if t in done and t.exception() is not None]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if failed:
            raise failed[0].exception()  # type: ignore[misc]
        return [tasks[slot].result() for slot in slots]

    async def aclose(self) -> None:
        """Release the worker pool and the HTTP transport."""
        self._pool.shutdown()
        self._system_resolver.close()
        await self._transport.aclose()

    # --- steps ----------------------------------------------------------------------------

    async def _load(self, url: str, max_pixels: int | None, detail: str | None) -> LoadedImage:
        if max_pixels is not None and max_pixels < 1:
            raise ImageError("max_pixels must be a positive number of pixels.")
        ceiling = effective_max_pixels(self.family, self._ceiling, max_pixels, detail)
        parsed = parse_image_url(url)
        seen: URLCache | None = None
        if isinstance(parsed, HttpURL):
            seen, seen_key, label = self._urls, url, "url"
        elif isinstance(parsed, DataURL):
            # A data: URL's text names its bytes, so a picture sent again is found by a hash
            # of the text, without decoding its base64 (2-3.5 ms per MB on the test VM,
            # holding the GIL) or hashing the bytes it decodes to.
            text = url.encode("utf-8", "surrogatepass")
            seen_key = await self._offload(len(text), lambda: hashlib.sha256(text).hexdigest())
            seen, label = self._data_urls, "data_url"
        if seen is not None:
            digest = seen.get(seen_key)
            cached = self._content.get((digest, ceiling)) if digest is not None else None
            self._metrics.image_cache.labels(cache=label, result="hit" if cached else "miss").inc()
            if cached is not None:
                return cached
        data = await self._read(parsed)
        digest = await self._offload(len(data), lambda: hashlib.sha256(data).hexdigest())
        if seen is not None:
            seen.put(seen_key, digest)
        key = (digest, ceiling)
        cached = self._content.get(key)
        self._metrics.image_cache.labels(cache="content", result="hit" if cached else "miss").inc()
        if cached is not None:
            return cached
        return await self._decode_shared(data, key)

    async def _decode_shared(self, data: bytes, key: tuple[str, int | None]) -> LoadedImage:
        """Decode `data` into the content cache, once per (digest, ceiling) at a time: loads of
        the same picture while it decodes (a popular picture under load, before the cache has
        it) wait for that decode instead of each taking a worker and its memory. A decode
        every load has left is dropped: one still queued for a worker never runs (else a
        request failing fast on its last picture would leave the others' decodes queued, and
        a stream of such requests would hold every worker), one running ends in its thread."""
        return await self._shared(self._decodes, key, lambda: self._decode(data, key))
    async def _decode(self, data: bytes, key: tuple[str, int | None]) -> LoadedImage:
        digest, ceiling = key
        started = time.perf_counter()

        def decode() -> tuple[tuple[Image.Image, tuple[int, int]], float]:
            began = time.perf_counter()
            decoded = decode_image(data, limits=self._decode_limits, family=self.family, max_pixels=ceiling)
            return decoded, time.perf_counter() - began

        (image, original_size), took = await self._in_pool(decode)
        self._metrics.image_decode_seconds.observe(took)
        self._metrics.image_decode_wait_seconds.observe(max(time.perf_counter() - started - took, 0.0))
        loaded = LoadedImage(image, original_size, digest, pixels_id=f"{digest}:{ceiling}")
        self._content.put(key, loaded, nbytes=image.width * image.height * 3)
        return loaded

    async def _read(self, parsed: ImageURL) -> bytes:
        started = time.perf_counter()
        if isinstance(parsed, HttpURL):
            data = await self._fetch_shared(parsed)
        elif isinstance(parsed, DataURL):
            data = await decode_data_url(parsed, self.settings.image_max_bytes)
        else:
            assert isinstance(parsed, FileURL)
            data = await self._in_pool(functools.partial(self._local.read, parsed))
        self._metrics.image_fetch_seconds.observe(time.perf_counter() - started)
        self._metrics.image_bytes.observe(len(data))
        return data

    async def _fetch_shared(self, url: HttpURL) -> bytes:
        """`HttpFetcher.fetch`, one download per URL at a time: a request for a URL already
        being fetched (the same picture twice in a request, or popular pictures under load
        before the URL cache has them) waits for that download. The download is cancelled
        when every request waiting for it has gone."""
        return await self._shared(self._downloads, str(url), lambda: self._fetcher.fetch(url))

    @staticmethod
    async def _shared(registry: dict, key: object, start: Callable[[], Awaitable[T]]) -> T:
        """`start()`'s result, the work run once per `key` at a time in `registry`: loads that
        ask for a key in flight wait for that run, which is cancelled once every load waiting
        for it has gone. An `ImageError` is raised to each load as a copy of its own (`load`
        fills in the request's `param`)."""
        shared = registry.get(key)
        if shared is None:
            shared = _Shared(asyncio.ensure_future(start()))
            registry[key] = shared
            shared.task.add_done_callback(lambda _: _forget(registry, key, shared))
        shared.waiters += 1
        try:
            return await asyncio.shield(shared.task)
        except ImageError as exc:
            raise copy.copy(exc) from exc.__cause__
        finally:
            shared.waiters -= 1
            if shared.waiters == 0 and not shared.task.done():
                if registry.get(key) is shared:
                    del registry[key]  # a load arriving now starts afresh
                shared.task.cancel()

    async def _in_pool(self, fn: Callable[[], T]) -> T:
        return await self._pool.run(fn)

    async def _offload(self, size: int, fn: Callable[[], T]) -> T:
        """Run small jobs inline, large ones in the worker pool."""
        return fn() if size < OFFLOAD_BYTES else await self._in_pool(fn)


def _forget(registry: dict, key: object, shared: _Shared) -> None:
    """A shared run ended: out of `registry`, its failure retrieved (a run every load left
    logs nothing)."""
    if registry.get(key) is shared:
        del registry[key]
    if not shared.task.cancelled():
        shared.task.exception()
