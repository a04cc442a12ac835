"""Per-app runtime state: the engine (loaded in the background), the chat service, admission
control, and the lifecycle flags that /health and /ready report."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request

from server.admission import Admission, BodyBudget, BodyCutoff
from server.chat.service import ChatService, Prepared, stream_ended_with
from server.chat.sse import sse_done, sse_event, with_keepalive
from server.engine.base import Engine, EngineDeadError, EngineSettingsError
from server.errors import APIError, InternalError, RequestTimeoutError, ServiceUnavailableError
from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger(__name__)

_SHUT_DOWN = "The server shut down before the response was complete."
# How often a drain that is still waiting logs what it waits for.
_DRAIN_REPORT_S = 10.0
ENGINE_STOPPED = "The inference engine stopped; retry on another replica."
RETRY_SOON = {"Retry-After": "1"}

EngineFactory = Callable[[], Engine]
ImagesFactory = Callable[[Engine], Any]


class Runtime:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        model_names: list[str],
        engine_factory: EngineFactory | None,
        engine: Engine | None,
        images_factory: ImagesFactory,
        on_fatal: Callable[[int], None] | None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.model_names = model_names
        self.admission = Admission(settings.max_concurrent_requests, settings.max_queued_requests, metrics)
        self.body_budget = BodyBudget(settings.max_body_bytes_held, metrics)
        self.body_cutoff = BodyCutoff()
        # HTTP requests that arrived before any drain and are still open, wherever they are
        # (their body arriving, queued, running): a drain waits for them all.
        self._open = 0
        self._none_open = asyncio.Event()
        self._none_open.set()
        self.engine: Engine | None = None
        self.images: Any = None
        self._service: ChatService | None = None
        self._engine_factory = engine_factory
        self._images_factory = images_factory
        self._on_fatal = on_fatal
        self._pending_engine = engine
        self.started_at = int(time.time())
        self.dead = False
        self.draining = False
        self.load_failed = False
        self._tasks: list[asyncio.Task] = []
        # Set at the end of a drain or when the engine dies: open requests stop with a clean
        # error saying `abort_message`.
        self.abort_all = asyncio.Event()
        self.abort_message = _SHUT_DOWN

    # --- lifecycle ------------------------------------------------------------------------

    async def startup(self) -> None:
        if self._pending_engine is not None:
            self._install(self._pending_engine)
        else:
            self._tasks.append(asyncio.create_task(self._load_engine()))
        self._tasks.append(asyncio.create_task(self._watch_engine()))

    async def _load_engine(self) -> None:
        try:
            # Loading blocks for tens of seconds; a thread keeps /health and /ready answering.
            engine = await asyncio.to_thread(self._engine_factory)
        except EngineSettingsError as exc:
            log.error("the engine refused its settings: %s", exc)
            self.load_failed = True
            self._fatal(2)  # (as the settings refused before loading)
            return
        except Exception:
            log.exception("engine failed to start")
            self.load_failed = True
            self._fatal(1)
            return
        try:
            self._install(engine)
        except Exception:
            # (otherwise the task ends with its exception unseen, and the server stays
            # "loading" for good while its liveness probe says it is fine)
            log.exception("the server failed to start with the loaded engine")
            self.load_failed = True
            with contextlib.suppress(Exception):
                await engine.shutdown()
            self._fatal(1)
            return
        _freeze_startup_heap()

    def _install(self, engine: Engine) -> None:
        self.images = self._images_factory(engine)
        self._service = ChatService(self.settings, engine, self.images, self.metrics, self.model_names)
        self.engine = engine
        post_start = getattr(engine, "attach_to_loop", None)
        if post_start is not None:
            post_start()

    async def _watch_engine(self) -> None:
        busy_since: float | None = None  # (monotonic) since when the engine has held requests
        while True:
            await asyncio.sleep(0.5)
            engine = self.engine
            if engine is None or self.dead:
                continue
            if engine.is_dead:
                log.error("the inference engine died; failing open requests and exiting")
                await self._engine_lost()
                return
            limit = self.settings.engine_stall_timeout
            if not limit or engine.num_unfinished_requests() == 0:
                busy_since = None
                continue
            now = time.monotonic()
            busy_since = busy_since or now
            quiet = now - max(busy_since, engine.last_output_at() or busy_since)
            if quiet > limit:
                log.error("the inference engine has held requests for %.0f s without any output "
                          "(--engine-stall-timeout %g); taking it for hung, failing open requests "
                          "and exiting", quiet, limit)
                await self._engine_lost()
                return

    async def _engine_lost(self) -> None:
        """The engine died or hung: fail every open request, then end the process (status 1)."""
        self.dead = True
        # End open requests ourselves rather than wait for vLLM to fail them: its
        # teardown can outlast the server's own exit, and a stream cut mid-way
        # tells the client nothing.
        self.abort(ENGINE_STOPPED)
        try:
            await asyncio.wait_for(self.admission.wait_idle(), 5)
        except asyncio.TimeoutError:
            log.error("requests still open after the engine stopped")
        self._fatal(1)

    def abort(self, message: str) -> None:
        """End every open request: streams with an SSE error event saying `message`, the
        others with a 503 saying it."""
        self.abort_message = message
        self.abort_all.set()

    def _fatal(self, code: int) -> None:
        if self._on_fatal is not None:
            self._on_fatal(code)

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.images is not None and hasattr(self.images, "aclose"):
            await self.images.aclose()
        if self.engine is not None:
            await self.engine.shutdown()

    @property
    def requests_open(self) -> int:
        """HTTP requests that arrived before any drain and are still open."""
        return self._open

    def request_opened(self) -> Callable[[], None] | None:
        """Count an HTTP request arriving before any drain; returns the call that ends it
        (exactly once), or None during a drain (the request is not waited for)."""
        if self.draining:
            return None
        self._open += 1
        self._none_open.clear()

        def closed() -> None:
            self._open -= 1
            if not self._open:
                self._none_open.set()

        return closed

    async def _quiet(self) -> None:
        """Return once every request that arrived before the drain has ended."""
        await self._none_open.wait()
        await self.admission.wait_idle()  # (the same requests; also those no middleware counted)

    async def drain(self, timeout: float) -> None:
        """Stop admitting, let the requests that arrived before it (in flight, queued, or
        still sending their body) finish for up to `timeout` seconds, then end the rest:
        streams get a final SSE error event, other requests a 503."""
        self.draining = True
        self.admission.close()
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                await asyncio.wait_for(self._quiet(), min(left, _DRAIN_REPORT_S))
                return
            except asyncio.TimeoutError:
                # A long drain says what it waits for: an operator (or a failed test) can
                # tell generation still under way from a request that makes no progress.
                self._log_drain_progress(max(0.0, deadline - time.monotonic()))
        log.warning("drain timeout: aborting %d requests, turning away %d queued and %d still sending their body",
                    self.admission.active, self.admission.queued, self._arriving())
        self.admission.turn_away_queue()
        self.body_cutoff.cut()
        self.abort(_SHUT_DOWN)
        try:
            await asyncio.wait_for(self._quiet(), 5)
        except asyncio.TimeoutError:
            log.error("requests still open after abort")

    def _arriving(self) -> int:
        """Requests counted open that are neither admitted nor queued (mostly: their body is
        still arriving)."""
        return max(0, self._open - self.admission.active - self.admission.queued)

    def _log_drain_progress(self, left: float) -> None:
        engine = self.engine
        open_ = max(self._open, self.admission.active)
        if engine is None:
            log.info("draining: %d requests open, %.0f s left", open_, left)
            return
        stats = engine.stats()
        log.info("draining: %d requests open (%d still sending their body), %.0f s left; "
                 "engine: %d unfinished, %d running, %d waiting",
                 open_, self._arriving(), left, engine.num_unfinished_requests(), stats.running, stats.waiting)

    @property
    def engine_dead(self) -> bool:
        """Whether the engine has died: as soon as the engine says so, not only once the
        watcher (every 0.5 s) has seen it and begun failing open requests."""
        return self.dead or (self.engine is not None and self.engine.is_dead)

    def state(self) -> str:
        if self.engine_dead or self.load_failed:
            return "dead"
        if self.draining:
            return "draining"
        if self.engine is None:
            return "loading"
        return "ready"

    def chat_service(self, *, before_drain: bool = False) -> ChatService:
        """The chat service, or a 503 saying why not. `before_drain`: the request arrived
        before a drain began, which then still serves it."""
        state = self.state()
        if state == "draining" and before_drain and self._service is not None:
            return self._service
        if state != "ready" or self._service is None:
            message = {
                "loading": "The model is still loading; retry shortly.",
                "draining": "The server is shutting down and accepts no new requests; retry on another replica.",
                "dead": "The inference engine is not running.",
            }[state]
            if state == "draining":
                self.metrics.admission_refused.labels("draining").inc()
            raise ServiceUnavailableError(message, headers=RETRY_SOON)
        return self._service

    # --- request helpers ------------------------------------------------------------------

    async def admit(self, request: Request, timeout: float) -> Callable[[], None]:
        """`Admission.acquire()` for `request`, given up (its queue place freed) when the
        client goes away (`ClientGone`) or `timeout` seconds pass (504) while it waits."""
        before_close = before_drain(request)
        if not self.admission.would_wait:
            return await self.admission.acquire(before_close=before_close)
        acquiring = asyncio.ensure_future(self.admission.acquire(before_close=before_close))
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({acquiring, watcher}, timeout=max(timeout, 0.001),
                                         return_when=asyncio.FIRST_COMPLETED)
            if acquiring in done:
                return acquiring.result()  # a slot, or the 429/503 refusal
            acquiring.cancel()
            await _quietly(acquiring)
            if not acquiring.cancelled() and acquiring.exception() is None:
                acquiring.result()()  # the slot came as the wait ended: give it back
            if watcher in done:
                raise ClientGone()
            raise RequestTimeoutError(
                f"The request waited longer than the server's {self.settings.request_timeout:g} s deadline "
                "for a processing slot."
            )
        finally:
            watcher.cancel()
            await _quietly(watcher)

    async def prepare_while_connected(self, request: Request, preparing: Awaitable[Prepared],
                                      timeout: float) -> Prepared:
        """Await `preparing` (image fetches, decoding, processing), given up when the client
        goes away (`ClientGone`) or after `timeout` seconds (`TimeoutError`): a client gone
        while its pictures download would otherwise hold its slot until every fetch ended."""
        task = asyncio.ensure_future(preparing)
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({task, watcher}, timeout=max(timeout, 0.001),
                                         return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            task.cancel()
            await _quietly(task)
            if not task.cancelled() and task.exception() is None:
                await _aclose(task.result().stream)  # done as it was cancelled: never to be read
            if watcher in done:
                raise ClientGone()
            raise TimeoutError
        finally:
            watcher.cancel()
            await _quietly(watcher)
            if not task.done():  # (this handler was cancelled: a shutdown)
                task.cancel()
                await _quietly(task)
                if not task.cancelled() and task.exception() is None:
                    await _aclose(task.result().stream)

    async def until_disconnect(self, request: Request, work: Awaitable[Any], prepared: Prepared) -> Any:
        """Await `work`, cancelling it (which aborts the engine request) if the client goes
        away or the per-request deadline passes."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        stopper = asyncio.ensure_future(self.abort_all.wait())
        remaining = self.settings.request_timeout - (time.perf_counter() - prepared.started)
        try:
            done, _ = await asyncio.wait({task, watcher, stopper}, timeout=max(remaining, 0.001),
                                         return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            task.cancel()
            await _quietly(task)
            if watcher in done:
                raise ClientGone()
            if stopper in done:
                raise ServiceUnavailableError(self.abort_message, headers=RETRY_SOON)
            raise RequestTimeoutError(
                f"The request took longer than the server's {self.settings.request_timeout:g} s deadline."
            )
        except EngineDeadError as exc:
            raise ServiceUnavailableError(ENGINE_STOPPED, headers=RETRY_SOON) from exc
        finally:
            for aux in (watcher, stopper):
                aux.cancel()
                await _quietly(aux)
            # Whatever ended the work: a failure in one of n choices (a grammar dead end, say)
            # raises while the others still run, and the traceback's reference cycle would
            # keep the engine's stream (and its requests) alive until a garbage collection.
            await _aclose(prepared.stream)

    async def stream_with_deadline(
        self, events: AsyncIterator[str], prepared: Prepared, release: Callable[[], None]
    ) -> AsyncIterator[str]:
        """Wrap an SSE stream: keep-alive comments, the per-request deadline, tracking for
        draining, and the admission slot released at the end. A failure before the first
        event is raised as an `APIError` (the response has not begun: it becomes an HTTP
        error, a 503 that clients and proxies retry elsewhere); after it, it becomes an error
        event plus `[DONE]`."""
        deadline = prepared.started + self.settings.request_timeout
        pumped = with_keepalive(events, self.settings.sse_keepalive_interval, deadline, self.abort_all,
                                lambda: ServiceUnavailableError(self.abort_message, headers=RETRY_SOON))
        began = False
        try:
            try:
                async for item in pumped:
                    began = True
                    yield item
                return
            except TimeoutError:
                err: APIError = RequestTimeoutError(
                    f"The request took longer than the server's {self.settings.request_timeout:g} s deadline."
                )
            except EngineDeadError:
                err = ServiceUnavailableError(ENGINE_STOPPED, headers=RETRY_SOON)
            except APIError as exc:
                err = exc
            except Exception:
                log.exception("stream failed")
                err = InternalError("The server failed while generating the response.")
            stream_ended_with(prepared.stats, err)
            if not began:
                raise err
            yield sse_event(err.to_dict())
            yield sse_done()
        finally:
            try:
                # Closing the pump cancels its pending read and closes `events`, which aborts
                # the engine request when the client went away mid-stream.
                await _aclose(pumped)
                await _aclose(events)
                # and the engine's own stream, in case `events` was closed while suspended at
                # a yield (an abandoned response): its abort would otherwise wait for the collector
                await _aclose(prepared.stream)
            finally:
                release()  # even when a cancellation interrupts the closing

    def refresh_engine_gauges(self) -> None:
        if self.engine is None:
            return
        stats = self.engine.stats()
        self.metrics.requests_running.set(stats.running)
        self.metrics.requests_waiting.set(stats.waiting)
        self.metrics.kv_cache_usage.set(stats.kv_cache_usage)
        self.metrics.engine_unfinished.set(self.engine.num_unfinished_requests())


def before_drain(request: Request) -> bool:
    """Whether `request` arrived before a drain began (GatewayMiddleware marks it)."""
    return request.scope.get("state", {}).get("before_drain", False)


class ClientGone(Exception):
    """The client disconnected; nothing is sent back."""


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _quietly(task: asyncio.Future) -> None:
    try:
        await task
    except BaseException:
        pass


async def _aclose(gen: Any) -> None:
    aclose = getattr(gen, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:
            pass


def _freeze_startup_heap() -> None:
    """Move everything allocated so far (torch, transformers, vLLM, the tokenizer: millions
    of objects that live as long as the process) out of the garbage collector's reach.

    Otherwise every full collection walks them all while serving, stopping the event loop
    for tens of milliseconds at a time: probes and streams all wait. vLLM's own server does
    the same after start-up. Called once, after the engine is loaded and before the server
    reports ready; objects allocated later are collected as usual."""
    gc.collect()
    gc.freeze()
