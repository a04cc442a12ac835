"""`with_keepalive`, the wrapper every streamed answer goes through: its items, comments,
deadline, stop and closing, driven directly on an event loop (no engine)."""

from __future__ import annotations

import asyncio
import time

import pytest

from server.chat.sse import sse_comment, with_keepalive
from server.errors import ServiceUnavailableError

COMMENT = sse_comment()


class Source:
    """An async iterator of `items`, each after `gaps[i]` seconds (0: at once), that records
    how many reads began and whether it was closed or cancelled."""

    def __init__(self, items, gaps=None, fail: BaseException | None = None):
        self.items = list(items)
        self.gaps = list(gaps) if gaps is not None else [0.0] * len(self.items)
        self.fail = fail
        self.reads = 0
        self.closed = False
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        i = self.reads
        self.reads += 1
        try:
            if i < len(self.gaps) and self.gaps[i]:
                await asyncio.sleep(self.gaps[i])
            else:
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if i < len(self.items):
            return self.items[i]
        if self.fail is not None:
            raise self.fail
        raise StopAsyncIteration

    async def aclose(self):
        self.closed = True


async def collect(gen, limit=None):
    out = []
    async for item in gen:
        out.append(item)
        if limit is not None and len(out) >= limit:
            break
    return out


def test_items_pass_through_in_order_without_comments_when_they_come_quickly():
    src = Source([f"data: {i}\n\n" for i in range(50)])
    out = asyncio.run(collect(with_keepalive(src, 5.0)))
    assert out == src.items
    assert src.closed


def test_an_idle_source_gets_comments_and_then_its_items():
    src = Source(["a", "b"], gaps=[0.35, 0.0])
    out = asyncio.run(collect(with_keepalive(src, 0.1)))
    assert out[-2:] == ["a", "b"]
    comments = out[:-2]
    assert 2 <= len(comments) <= 4 and set(comments) == {COMMENT}


def test_no_item_is_lost_when_it_comes_as_the_comment_is_due():
    # Items whose read ends a few microseconds before (or as) the keep-alive timer fires:
    # both then run in the same turn of the loop, the read's first. Each item must still
    # come out, once, in order.
    n, interval = 80, 0.01
    src = Source(list(range(n)), gaps=[interval - (0, 5e-6, 20e-6, 60e-6)[i % 4] for i in range(n)])

    async def go():
        return await collect(with_keepalive(src, interval, deadline=time.perf_counter() + 30))

    out = asyncio.run(go())
    assert [x for x in out if x != COMMENT] == list(range(n))
    assert COMMENT in out  # the timer did fire with reads about to end


def test_nothing_is_read_ahead_of_the_consumer():
    src = Source(list(range(5)))

    async def go():
        gen = with_keepalive(src, 5.0)
        seen = []
        async for item in gen:
            seen.append(item)
            # the next read begins only when the next item is asked for
            await asyncio.sleep(0.01)
            assert src.reads == len(seen)
        return seen

    assert asyncio.run(go()) == list(range(5))


def test_the_deadline_raises_timeout_and_cancels_and_closes_the_source():
    src = Source(["a", "b"], gaps=[0.0, 5.0])

    async def go():
        out = []
        with pytest.raises(TimeoutError):
            async for item in with_keepalive(src, 0.05, deadline=time.perf_counter() + 0.3):
                out.append(item)
        return out

    t0 = time.perf_counter()
    out = asyncio.run(go())
    assert time.perf_counter() - t0 < 2.0
    assert out[0] == "a" and set(out[1:]) == {COMMENT}
    assert src.cancelled and src.closed


def test_a_deadline_already_passed_raises_before_reading():
    src = Source(["a"])

    async def go():
        return await collect(with_keepalive(src, 1.0, deadline=time.perf_counter() - 1))

    with pytest.raises(TimeoutError):
        asyncio.run(go())


@pytest.mark.parametrize("custom", [False, True])
def test_a_stop_ends_a_waiting_stream_with_the_stop_error(custom):
    src = Source(["a", "b"], gaps=[0.0, 5.0])

    class Stopped(Exception):
        pass

    async def go():
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.1, stop.set)
        out = []
        gen = with_keepalive(src, 1.0, stop=stop, stop_error=Stopped if custom else None)
        with pytest.raises(Stopped if custom else ServiceUnavailableError) as info:
            async for item in gen:
                out.append(item)
        return out, info.value

    out, err = asyncio.run(go())
    assert out == ["a"]
    if not custom:
        assert "shut down" in str(err)
    assert src.cancelled and src.closed


def test_a_stop_set_before_the_stream_began_ends_it_at_once():
    src = Source(["a"])

    async def go():
        stop = asyncio.Event()
        stop.set()
        return await collect(with_keepalive(src, 1.0, stop=stop))

    with pytest.raises(ServiceUnavailableError):
        asyncio.run(go())


def test_closing_the_stream_mid_read_cancels_the_read_and_closes_the_source():
    src = Source(["a", "b"], gaps=[0.0, 5.0])

    async def go():
        gen = with_keepalive(src, 1.0)
        first = await gen.__anext__()
        read = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0.05)
        read.cancel()  # a client gone: the response's task is cancelled
        with pytest.raises(asyncio.CancelledError):
            await read
        await gen.aclose()
        return first

    assert asyncio.run(go()) == "a"
    assert src.cancelled and src.closed


def test_closing_the_stream_between_items_closes_the_source():
    src = Source(list(range(10)))
    assert asyncio.run(collect(with_keepalive(src, 1.0), limit=3)) == [0, 1, 2]
    # (collect's early break leaves the generator to be finalised; close it explicitly)

    async def go():
        gen = with_keepalive(src2, 1.0)
        await gen.__anext__()
        await gen.aclose()

    src2 = Source(list(range(10)))
    asyncio.run(go())
    assert src2.closed and src2.reads == 1


@pytest.mark.parametrize("error", [ValueError("boom"), ServiceUnavailableError("engine gone")])
def test_the_sources_exception_reaches_the_consumer(error):
    src = Source(["a"], fail=error)

    async def go():
        out = []
        with pytest.raises(type(error)) as info:
            async for item in with_keepalive(src, 1.0):
                out.append(item)
        return out, info.value

    out, err = asyncio.run(go())
    assert out == ["a"] and err is error
    assert src.closed


def test_many_streams_at_once_each_get_their_own_items():
    async def go():
        sources = [Source([(s, i) for i in range(20)], gaps=[0.001 * (s % 3)] * 20) for s in range(64)]
        results = await asyncio.gather(*(collect(with_keepalive(src, 0.5)) for src in sources))
        return sources, results

    sources, results = asyncio.run(go())
    for src, out in zip(sources, results):
        assert out == src.items
