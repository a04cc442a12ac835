"""Bounded caches that let repeated images skip fetching and decoding.

`ContentCache`: decoded images keyed by (content digest, pixel ceiling), least recently
used evicted first, bounded by entry count and by decoded bytes.
`URLCache`: URL -> content digest for a limited time, so a repeated URL skips the fetch.
Both are used from the event loop only (no locking).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")

#: Default bound on the decoded bytes a ContentCache holds.
DEFAULT_CACHE_BYTES = 1 << 30


class ContentCache(Generic[V]):
    """LRU of values with a size in bytes; `max_entries=0` disables it."""

    def __init__(self, max_entries: int, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: Hashable, value: V, nbytes: int) -> None:
        """Store `value`; an entry larger than the whole byte budget is not stored."""
        if self.max_entries <= 0 or nbytes > self.max_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.nbytes -= old[1]
        self._items[key] = (value, nbytes)
        self.nbytes += nbytes
        while len(self._items) > self.max_entries or self.nbytes > self.max_bytes:
            _, (_, size) = self._items.popitem(last=False)
            self.nbytes -= size


class URLCache:
    """URL -> digest with a time to live; bounded like the content cache by entry count."""

    def __init__(self, ttl: float, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._items: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def get(self, url: str) -> str | None:
        item = self._items.get(url)
        if item is None:
            return None
        digest, expires = item
        if self._clock() >= expires:
            del self._items[url]
            return None
        self._items.move_to_end(url)
        return digest

    def put(self, url: str, digest: str) -> None:
        if self.ttl <= 0 or self.max_entries <= 0:
            return
        self._items.pop(url, None)
        self._items[url] = (digest, self._clock() + self.ttl)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def discard(self, url: str) -> None:
        self._items.pop(url, None)
