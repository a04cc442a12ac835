"""The bounded caches: LRU by count and by bytes, URL entries expire after their TTL."""

from __future__ import annotations

from server.images.cache import ContentCache, URLCache


def test_content_cache_evicts_least_recently_used():
    cache: ContentCache[str] = ContentCache(max_entries=2)
    cache.put("a", "A", 1)
    cache.put("b", "B", 1)
    assert cache.get("a") == "A"  # a is now the most recent
    cache.put("c", "C", 1)
    assert cache.get("b") is None and cache.get("a") == "A" and cache.get("c") == "C"
    assert len(cache) == 2


def test_content_cache_byte_budget():
    cache: ContentCache[str] = ContentCache(max_entries=100, max_bytes=10)
    cache.put("a", "A", 4)
    cache.put("b", "B", 4)
    cache.put("c", "C", 4)
    assert cache.get("a") is None and cache.nbytes == 8
    cache.put("huge", "H", 11)  # larger than the whole budget: not stored, nothing evicted
    assert cache.get("huge") is None and cache.nbytes == 8
    cache.put("b", "B2", 2)  # replacing an entry updates the byte count
    assert cache.get("b") == "B2" and cache.nbytes == 6


def test_content_cache_disabled():
    cache: ContentCache[str] = ContentCache(max_entries=0)
    cache.put("a", "A", 1)
    assert cache.get("a") is None


def test_url_cache_ttl():
    now = [100.0]
    cache = URLCache(ttl=10, max_entries=2, clock=lambda: now[0])
    cache.put("http://x/a", "d1")
    now[0] = 109.9
    assert cache.get("http://x/a") == "d1"
    now[0] = 110.0
    assert cache.get("http://x/a") is None
    cache.put("u1", "1")
    cache.put("u2", "2")
    cache.put("u3", "3")
    assert cache.get("u1") is None and cache.get("u3") == "3"
    off = URLCache(ttl=0, max_entries=10)
    off.put("u", "d")
    assert off.get("u") is None
