"""`ImageLoader`: image URL in, model-ready RGB picture out.

It ties the pieces together: parse the URL once (`urls`), get the bytes (`fetch` for
http(s) under the address/domain policies, `local` for data: and file:), hash them, look
them up in the caches, and decode in a bounded thread pool (`decode`) so the event loop
never runs pixel work. Every failure is an `ImageError` subclass (a 400 with a specific
code) and is counted in `image_rejections{code}`.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from PIL import Image

from ..errors import ImageError
from ..metrics import Metrics
from ..settings import Settings
from .cache import DEFAULT_CACHE_BYTES, ContentCache, URLCache
from .decode import DecodeLimits, decode_image, prepare
from .family import effective_max_pixels, family_spec
from .fetch import FetchLimits, HttpFetcher, build_transport
from .limits import check_image_count
from .local import LocalMediaReader, decode_data_url
from .policy import AddressPolicy, DomainPolicy
from .resolve import Resolver, system_resolver
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


class ImageLoader:
    """Loads image URLs for one model family. Create one per app; close with `aclose`."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        family: str,
        transport: Transport | None = None,
        resolver: Resolver | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        """`family`: qwen-vl, qwen2-vl, qwen2.5-vl or qwen3-vl. `transport`: the HTTP client
        for image URLs (must connect to the address it is given, never through a proxy; the
        loader closes it), else an aiohttp one is created.
        `resolver`: host name resolution (default: the system resolver in a thread).
        Raises ValueError for an unknown family or a malformed --image-allow-networks."""
        self.settings = settings
        self.family = family_spec(family)
        self._metrics = metrics
        limits = FetchLimits(
            max_bytes=settings.image_max_bytes,
            total_timeout=settings.image_fetch_timeout,
            connect_timeout=settings.image_connect_timeout,
            max_redirects=settings.image_max_redirects,
        )
        self._transport = transport or build_transport(limits, settings.image_fetch_concurrency)
        self._fetcher = HttpFetcher(
            self._transport,
            addresses=AddressPolicy(settings.image_allow_networks),
            domains=DomainPolicy(settings.image_allowed_domains, settings.image_denied_domains),
            resolver=resolver or system_resolver,
            limits=limits,
            concurrency=settings.image_fetch_concurrency,
        )
        self._local = LocalMediaReader(settings.allowed_local_media_path, settings.image_max_bytes)
        self._decode_limits = DecodeLimits(settings.image_max_input_pixels, settings.image_max_frames)
        prepare()
        self._pool = ThreadPoolExecutor(settings.image_decode_workers, thread_name_prefix="image-decode")
        self._content: ContentCache[LoadedImage] = ContentCache(settings.image_cache_size, cache_bytes)
        self._urls = URLCache(settings.image_url_cache_ttl, settings.image_cache_size * URL_ENTRIES_PER_IMAGE)

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
        ("low": `FamilySpec.low_detail_max_pixels`; "high", "auto", None: no change). `param` is set
        as the error's `param` (e.g. "messages[1].content[2].image_url"). Raises only
        ImageError subclasses: ImageURLForbiddenError, ImageFetchError, ImageTooLargeError,
        ImageDecodeError, or ImageError (code invalid_image) for malformed URLs and shapes
        the model cannot take."""
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
        tasks = [
            asyncio.create_task(self.load(url, max_pixels=max_pixels, detail=details[i] if details else None,
                                          param=params[i] if params else None))
            for i, url in enumerate(urls)
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
        return [task.result() for task in tasks]

    async def aclose(self) -> None:
        """Release the worker pool and the HTTP transport."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        await self._transport.aclose()

    # --- steps ----------------------------------------------------------------------------

    async def _load(self, url: str, max_pixels: int | None, detail: str | None) -> LoadedImage:
        if max_pixels is not None and max_pixels < 1:
            raise ImageError("max_pixels must be a positive number of pixels.")
        ceiling = effective_max_pixels(self.family, self.settings.image_max_pixels, max_pixels, detail)
        parsed = parse_image_url(url)
        cacheable_url = isinstance(parsed, HttpURL)
        if cacheable_url:
            digest = self._urls.get(url)
            cached = self._content.get((digest, ceiling)) if digest is not None else None
            self._metrics.image_cache.labels(cache="url", result="hit" if cached else "miss").inc()
            if cached is not None:
                return cached
        data = await self._read(parsed)
        digest = await self._offload(len(data), lambda: hashlib.sha256(data).hexdigest())
        if cacheable_url:
            self._urls.put(url, digest)
        key = (digest, ceiling)
        cached = self._content.get(key)
        self._metrics.image_cache.labels(cache="content", result="hit" if cached else "miss").inc()
        if cached is not None:
            return cached
        started = time.perf_counter()
        decode = functools.partial(
            decode_image, data, limits=self._decode_limits, family=self.family, max_pixels=ceiling
        )
        image, original_size = await self._in_pool(decode)
        self._metrics.image_decode_seconds.observe(time.perf_counter() - started)
        loaded = LoadedImage(image, original_size, digest, pixels_id=f"{digest}:{ceiling}")
        self._content.put(key, loaded, nbytes=image.width * image.height * 3)
        return loaded

    async def _read(self, parsed: ImageURL) -> bytes:
        started = time.perf_counter()
        if isinstance(parsed, HttpURL):
            data = await self._fetcher.fetch(parsed)
        elif isinstance(parsed, DataURL):
            data = await decode_data_url(parsed, self.settings.image_max_bytes)
        else:
            assert isinstance(parsed, FileURL)
            data = await self._in_pool(functools.partial(self._local.read, parsed))
        self._metrics.image_fetch_seconds.observe(time.perf_counter() - started)
        self._metrics.image_bytes.observe(len(data))
        return data

    async def _in_pool(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def _offload(self, size: int, fn: Callable[[], T]) -> T:
        """Run small jobs inline, large ones in the worker pool."""
        return fn() if size < OFFLOAD_BYTES else await self._in_pool(fn)
