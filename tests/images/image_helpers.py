"""Helpers for the image tests: the addresses, settings and a loader context. The local
HTTP server itself is the shared one in `tests/support/http_server.py`."""

from __future__ import annotations

import asyncio

from server.images import ImageLoader
from server.metrics import Metrics
from server.settings import Settings

ALLOWED_HOST = "127.0.0.2"
CANARY_HOST = "127.0.0.1"


def make_settings(**overrides) -> Settings:
    values = dict(
        image_allow_networks=[f"{ALLOWED_HOST}/32"],
        image_fetch_timeout=3.0,
        image_connect_timeout=1.0,
        image_max_bytes=200_000,
        image_decode_workers=2,
    )
    values.update(overrides)
    return Settings(**values)


async def use_loader(fn, *, family: str = "qwen2-vl", settings: Settings | None = None, **kwargs):
    """Build a loader, run `await fn(loader)`, close the loader; returns fn's result."""
    loader = ImageLoader(settings or make_settings(), kwargs.pop("metrics", None) or Metrics(),
                         family=family, **kwargs)
    try:
        return await fn(loader)
    finally:
        await loader.aclose()


def load_one(url: str, **kwargs):
    """Load one URL with a fresh loader (see use_loader for the options)."""
    max_pixels = kwargs.pop("max_pixels", None)
    detail = kwargs.pop("detail", None)
    return asyncio.run(use_loader(lambda loader: loader.load(url, max_pixels=max_pixels, detail=detail), **kwargs))
