"""Prometheus metrics, one `Metrics` object per app (its own registry, so tests can build
several apps in one process). Names share the `qwenvl_` prefix and carry unit suffixes;
label values are bounded (outcomes, error codes, endpoint names), never user input.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

from server import __version__

# Every counter and histogram would also export a `*_created` timestamp series, which
# Prometheus stores as one more gauge per series and nobody graphs. The switch is global to
# prometheus_client; this process exports no other registry.
disable_created_metrics()

# (up to the default --request-timeout, 600 s)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TOKEN_BUCKETS = (1, 8, 32, 128, 512, 1024, 2048, 4096, 8192, 16384, 32768)
_BYTES_BUCKETS = (1e3, 1e4, 1e5, 3e5, 1e6, 3e6, 1e7, 3e7)


#: The outcomes of chat completion requests (`requests` label).
OUTCOMES = ("success", "client_error", "server_error", "rate_limited", "unavailable", "cancelled")


class Metrics:
    """All server metrics. Created once by the app factory."""

    def __init__(self, registry: CollectorRegistry | None = None, model_names: list[str] | None = None) -> None:
        """`model_names`: the names the server answers to, for `qwenvl_build_info`."""
        own = registry is None
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        if own:
            # The standard process_* (CPU, memory, open files) and python_info series, which
            # dashboards and alerts expect of every scrape target.
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        p = "qwenvl_"
        self.build_info = Gauge(p + "build_info", "Always 1: the server's version and the model names it serves.",
                                ["version", "model"], registry=r)
        for name in model_names or ():
            self.build_info.labels(version=__version__, model=name).set(1)
        self.requests = Counter(
            p + "requests", f"Chat completion requests by outcome ({', '.join(OUTCOMES)}).", ["outcome"], registry=r
        )
        self.errors = Counter(p + "errors", "Errors returned to clients by error code.", ["code"], registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time to first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(p + "time_per_output_token_seconds", "Mean time per output token "
                              "after the first, per request.", buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(p + "request_duration_seconds", "End-to-end request latency.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens processed (image tokens included).",
                                     registry=r)
        self.completion_tokens = Counter(
            p + "completion_tokens", "Completion tokens of the answers, as far as the server took them from the "
            "engine (a stream whose client stopped reading counts what it was given; the copied choices of a "
            "greedy n > 1 request, which runs once, not counted again).", registry=r)
        self.prompt_tokens_per_request = Histogram(p + "request_prompt_tokens", "Prompt tokens per request.",
                                                   buckets=_TOKEN_BUCKETS, registry=r)
        self.requests_running = Gauge(p + "requests_running", "Requests running in the engine.", registry=r)
        self.requests_waiting = Gauge(p + "requests_waiting", "Requests waiting in the engine's queue.",
                                      registry=r)
        self.engine_unfinished = Gauge(p + "engine_unfinished_requests", "Requests the engine client still "
                                       "tracks (running, waiting or finishing).", registry=r)
        self.kv_cache_usage = Gauge(p + "kv_cache_usage_ratio", "Share of the paged KV cache in use (0-1).",
                                    registry=r)
        # admission (front door, before any image work)
        self.admitted = Counter(p + "admission_admitted", "Requests admitted to processing.", registry=r)
        self.admission_refused = Counter(p + "admission_refused", "Requests refused by backpressure.",
                                         ["reason"], registry=r)
        self.inflight = Gauge(p + "admission_inflight_requests", "Requests being processed.", registry=r)
        self.queued = Gauge(p + "admission_queued_requests", "Requests waiting for a processing slot.",
                            registry=r)
        self.body_bytes_held = Gauge(p + "request_body_bytes_held",
                                     "Request-body bytes being read or parsed, beyond each body's first MiB "
                                     "(--max-body-bytes-held).",
                                     registry=r)
        # images
        self.image_fetch_seconds = Histogram(p + "image_fetch_seconds", "Time to fetch one image (URL or data:).",
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.image_decode_seconds = Histogram(p + "image_decode_seconds", "Time to decode and resize one image.",
                                              buckets=_LATENCY_BUCKETS, registry=r)
        self.image_decode_wait_seconds = Histogram(
            p + "image_decode_wait_seconds", "Time one image waited for a decode worker (--image-decode-workers).",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.image_bytes = Histogram(p + "image_bytes", "Encoded size of images received.",
                                     buckets=_BYTES_BUCKETS, registry=r)
        self.image_cache = Counter(p + "image_cache", "Image cache lookups by cache (url: an http(s) "
                                   "URL seen before; data_url: a data: URL's text seen before; content: the "
                                   "bytes decoded before) and result (hit, miss).", ["cache", "result"], registry=r)
        self.image_rejections = Counter(p + "image_rejections", "Images refused, by error code.", ["code"],
                                        registry=r)
        # The label values known in advance start at 0: a series that first appears with its
        # first event hides that event from rate() and increase(), and from alerts on them.
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        for reason in ("queue_full", "draining", "body_budget"):
            self.admission_refused.labels(reason)
        for cache in ("url", "data_url", "content"):
            for result in ("hit", "miss"):
                self.image_cache.labels(cache=cache, result=result)
