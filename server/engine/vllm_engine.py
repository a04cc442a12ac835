"""`Engine` on vLLM's `AsyncLLM` (V1: continuous batching, paged KV cache).

The only module of the server that imports vLLM (the Qwen-VL model plugin aside).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import re
import time
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image

from server.chat.specials import keep_grounding_tags_when_skipping
from server.engine import parent_watch
from server.engine.base import (
    LARGE_DELTA_TOKENS,
    ChoiceDelta,
    Engine,
    EngineDeadError,
    EngineSettingsError,
    EngineStats,
    GenerationChunk,
    GenerationRequest,
    ModelInfo,
    TokenLogprob,
)
from server.errors import ContextLengthError, InvalidRequestError
from server.settings import Settings

log = logging.getLogger(__name__)

_FAMILIES = {
    "qwen": "qwen-vl",
    "qwen2_vl": "qwen2-vl",
    "qwen2_5_vl": "qwen2.5-vl",
    "qwen3_vl": "qwen3-vl",
    "qwen3_vl_moe": "qwen3-vl",
}


def family_of(model_type: str) -> str:
    """Our family name for a Hugging Face `model_type` (unknown types pass through)."""
    return _FAMILIES.get(model_type, model_type)


def detect_device(requested: str) -> str:
    """The device vLLM will run on: the platform of the installed vLLM build.

    Raises `EngineSettingsError` if `requested` names a device this build cannot use.
    """
    from vllm.platforms import current_platform

    actual = "cuda" if current_platform.is_cuda_alike() else current_platform.device_type
    if requested not in ("auto", actual):
        raise EngineSettingsError(
            f"--device {requested} requested, but the installed vLLM build runs on {actual}"
        )
    return actual


def engine_args_from_settings(settings: Settings, model: str, device: str, kv_cache_bytes: int | None = None):
    """Translate our settings into vLLM's `AsyncEngineArgs` (`kv_cache_bytes`: from
    `cpu_kv_cache_bytes`, on CPU)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    on_cpu = device == "cpu"
    kwargs: dict[str, Any] = dict(
        model=model,
        tokenizer=settings.tokenizer,
        revision=settings.revision,
        served_model_name=settings.served_model_name or model,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        tensor_parallel_size=settings.tensor_parallel_size,
        pipeline_parallel_size=settings.pipeline_parallel_size,
        distributed_executor_backend=settings.distributed_executor_backend,
        enforce_eager=on_cpu if settings.enforce_eager is None else settings.enforce_eager,
        limit_mm_per_prompt=_mm_limits(model, settings.limit_mm_per_prompt, settings),
        mm_processor_cache_type=settings.mm_processor_cache_type,
        mm_processor_cache_gb=settings.mm_processor_cache_gb,
        seed=settings.seed,
        generation_config=settings.generation_config,
        logits_processors=settings.logits_processors or None,
        trust_remote_code=_trust_remote_code(settings, model),
        download_dir=settings.download_dir,
        disable_log_stats=True,
        structured_outputs_config=_structured_outputs_config(),
    )
    if not on_cpu:
        kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
    elif kv_cache_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = kv_cache_bytes
    if settings.max_num_seqs is not None:
        kwargs["max_num_seqs"] = settings.max_num_seqs
    if settings.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = settings.max_num_batched_tokens
    if settings.enable_prefix_caching is not None:
        kwargs["enable_prefix_caching"] = settings.enable_prefix_caching
    if (raised := _raised_max_pixels(settings, model)) is not None:
        kwargs["mm_processor_kwargs"] = {"max_pixels": raised}
    return AsyncEngineArgs(**{k: v for k, v in kwargs.items() if v is not None})


def _engine_config(args):
    """vLLM's config for `args`, as `AsyncLLM.from_engine_args` builds it. Settings vLLM
    refuses (a `--max-model-len` beyond the model's, a tensor-parallel size that does not
    divide the heads) raise `EngineSettingsError` with vLLM's words, without pydantic's dump
    of every engine argument."""
    from pydantic import ValidationError
    from vllm.usage.usage_lib import UsageContext

    try:
        return args.create_engine_config(UsageContext.ENGINE_CONTEXT)
    except ValidationError as exc:
        raise EngineSettingsError("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) from exc
    except ValueError as exc:
        raise EngineSettingsError(str(exc)) from exc


def _trust_remote_code(settings: Settings, model: str) -> bool:
    """--trust-remote-code, except for a first-generation Qwen-VL checkpoint: the server's
    plugin implements that architecture, and with the flag on transformers would load the
    checkpoint's own tokenizer code (its auto_map) in place of the plugin's, which has no
    chat template (every chat request then fails). Guides for vLLM's own server ask for the
    flag, so it is dropped with a warning rather than refused."""
    if settings.trust_remote_code and _model_type(model, settings) == "qwen":
        log.warning("ignoring --trust-remote-code: Qwen-VL is served by this server's own "
                    "implementation, not by the checkpoint's code")
        return False
    return settings.trust_remote_code


def _structured_outputs(s):
    """vLLM's structured-output constraint for the answer's shape, or None."""
    from vllm.sampling_params import StructuredOutputsParams

    if s.json_schema is not None:
        return StructuredOutputsParams(json=s.json_schema)
    if s.json_object:
        return StructuredOutputsParams(json_object=True)
    if s.choice is not None:
        return StructuredOutputsParams(choice=list(s.choice))
    return None


#: xgrammar's log prefix in its messages: "[16:05:06] /project/cpp/json_schema_converter.cc:4944: "
_NATIVE_LOG_PREFIX = re.compile(r"\[\d{2}:\d{2}:\d{2}\] \S+:\d+: ")


#: xgrammar's assertion text before its own message: "Check failed: (val >= MIN_INT64_AS_DOUBLE) is false: "
_NATIVE_ASSERTION = re.compile(r"Check failed: \(.*?\) is false: ?")


#: What vLLM's check for "features not supported by xgrammar" looks for (vLLM 0.32,
#: has_xgrammar_unsupported_json_features), for a message that says which.
# (vLLM's has_xgrammar_unsupported_json_features; its message names none of them)
_XGRAMMAR_UNSUPPORTED = ("multipleOf on numbers; uniqueItems, contains, minContains or maxContains on "
                         "arrays; string formats xgrammar does not know; a pattern or format together "
                         "with minLength or maxLength; an allOf of two or more schemas; propertyNames "
                         "with properties, patternProperties, unevaluatedProperties or a bounded "
                         "pattern; patternProperties with properties, or with more than one pattern")


def _reason(exc: Exception) -> str:
    """An exception's message alone: `str()` of vLLM's validation error appends the rejected
    value, which is the client's own (a whole list, a schema) and not for echoing back."""
    return exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)


def _grammar_error(exc: Exception) -> str:
    """What vLLM (or xgrammar under it) says is wrong with a schema, without the native
    library's time stamp and source path."""
    text = _NATIVE_ASSERTION.sub("", _NATIVE_LOG_PREFIX.sub("", _reason(exc))).strip()[:300]
    if "not supported by xgrammar" in text:
        text += f" (one of: {_XGRAMMAR_UNSUPPORTED})"
    return text


def _structured_outputs_config():
    """JSON answers (response_format) through xgrammar, with no whitespace between JSON
    tokens: grammars that allow any amount of it let models (small or unsure ones above all)
    pad an answer with blank lines until max_tokens. xgrammar alone: vLLM builds one backend
    for all requests from the first that asks, so "auto" could end up on guidance, which
    takes no slow tokenizer such as Qwen-VL's."""
    from vllm.config import StructuredOutputsConfig

    return StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)


#: Model types whose processors resize with `smart_resize` under a `max_pixels` bound.
_SMART_RESIZE_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")


_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_hub_files: dict[tuple[str, str, str | None, str | None], dict[str, Any] | None] = {}


def _checkpoint_json(model: str, name: str, settings: Settings | None = None) -> dict[str, Any] | None:
    """The checkpoint's JSON file `name` (config.json, preprocessor_config.json): a local
    one, or for a hub id the hub's at the `--revision` vLLM loads, through the same
    `--download-dir` cache (small files vLLM fetches anyway); None where there is none or it
    cannot be read."""
    path = Path(model)
    if not path.exists() and _HUB_ID.fullmatch(model):
        revision = settings.revision if settings else None
        cache_dir = settings.download_dir if settings else None
        key = (model, name, revision, cache_dir)
        if key not in _hub_files:
            _hub_files[key] = _hub_json(model, name, revision, cache_dir)
        return _hub_files[key]
    try:
        data = json.loads((path / name).read_text()) if (path / name).is_file() else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _hub_json(model: str, name: str, revision: str | None, cache_dir: str | None) -> dict[str, Any] | None:
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        # (no network where it is cached)
        cached = try_to_load_from_cache(model, name, cache_dir=cache_dir, revision=revision)
        if cached is not None and not isinstance(cached, str):
            return None  # (the cache records that the repository has no such file)
        if not cached:
            cached = hf_hub_download(model, name, revision=revision, cache_dir=cache_dir)
        data = json.loads(Path(cached).read_text())
        return data if isinstance(data, dict) else None
    except Exception as exc:  # noqa: BLE001 - offline, no such repo or file, ...
        log.info("could not read %s's %s from the hub (%s); what it would set stays at vLLM's defaults",
                 model, name, type(exc).__name__)
        return None


def _model_type(model: str, settings: Settings | None = None) -> str | None:
    """The checkpoint's `model_type`, from its config.json; None where it cannot be read."""
    config = _checkpoint_json(model, "config.json", settings)
    return config.get("model_type") if config else None


def _raised_max_pixels(settings: Settings, model: str) -> int | None:
    """`--image-max-pixels` where it is above the checkpoint's own `max_pixels`, else None.
    The engine's processor shrinks every picture to its checkpoint's bound again, so a
    higher ceiling of ours takes effect only with the processor's bound raised to it."""
    wanted = settings.image_max_pixels
    if wanted is None or _model_type(model, settings) not in _SMART_RESIZE_TYPES:
        return None
    own = _image_processor_config(model, settings).get("max_pixels")
    return wanted if isinstance(own, int) and wanted > own else None


def _as_loaded(image: Image.Image) -> Any:
    """`image` as vLLM's own image loader hands it on, when it is already what that loader
    makes (RGB, upright, no metadata: what `server.images` decodes). vLLM then skips its
    EXIF pass over a bare PIL image, which copies all the pixels on every request, a picture
    its processor cache holds too (6 MB for a 1920x1080 photo). The encoded bytes it keeps beside the
    pixels are only ever hashed, when a request gives no id for the image: callers give one
    with each, so none are kept. Any other image is returned as it is, for vLLM to normalise."""
    if not isinstance(image, Image.Image) or image.mode != "RGB" or image.info:
        return image
    from vllm.multimodal.media import MediaWithBytes

    return MediaWithBytes(image, b"")


def _mm_limits(model: str, images: int, settings: Settings | None = None) -> dict[str, int]:
    """Images per prompt; video off where the model has it (we accept no video input, and
    vLLM would otherwise reserve memory for profiling one)."""
    limits = {"image": images}
    if _model_type(model, settings) in _SMART_RESIZE_TYPES:
        limits["video"] = 0
    return limits


def _chat_stop_ids(family: str) -> tuple[int, ...]:
    """Qwen-VL-Chat's turn ends: its checkpoints name only <|endoftext|> as EOS, but a chat
    turn also ends at <|im_end|> or a new <|im_start|>."""
    if family == "qwen-vl":
        from server.qwen_vl.tokenizer import CHAT_STOP_TOKEN_IDS

        return tuple(CHAT_STOP_TOKEN_IDS)
    return ()


def _image_processor_config(model: str, settings: Settings | None = None) -> dict[str, Any]:
    """min/max pixels and patch geometry of the checkpoint's image processor (local or hub
    cache), or {} where it has none."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        data = _checkpoint_json(model, name, settings)
        if data is None:
            continue
        data = data.get("image_processor", data)
        if not isinstance(data, dict):
            continue
        size = data.get("size") if isinstance(data.get("size"), dict) else {}
        return {
            "min_pixels": data.get("min_pixels") or size.get("shortest_edge"),
            "max_pixels": data.get("max_pixels") or size.get("longest_edge"),
            "patch_size": data.get("patch_size"),
            "merge_size": data.get("merge_size"),
        }
    return {}


#: vLLM samples greedily below this temperature (vllm.sampling_params._SAMPLING_EPS).
_GREEDY_BELOW = 1e-5
#: Stop token ids vLLM's GPU model runner masks per request while min_tokens holds them back
#: (its MAX_NUM_STOP_TOKEN_IDS; a module that needs Triton to import).
_MAX_MASKED_STOP_IDS = 128

_SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                      "presence_penalty", "frequency_penalty", "max_tokens")


def _sampling_defaults(model_config) -> dict[str, Any]:
    """The checkpoint's sampling defaults (generation_config.json, under our settings'
    `generation_config`), as vLLM's own server applies them to requests that leave them out."""
    try:
        diff = model_config.get_diff_sampling_param()
    except Exception as exc:  # noqa: BLE001 - an unreadable generation config: neutral defaults
        log.warning("could not read the model's generation config: %s", exc)
        return {}
    defaults = {k: diff[k] for k in _SAMPLING_DEFAULTS if diff.get(k) is not None}
    if defaults:
        log.info("sampling defaults from the model's generation config: %s", defaults)
    return defaults


class _StatsCapture:
    """Keeps the scheduler's latest numbers (vLLM calls `record` after each engine step)."""

    def __init__(self) -> None:
        self.latest = EngineStats()
        self.recorded_at: float | None = None  # (monotonic) the latest engine step's record

    def factory(self, vllm_config, engine_index: int = 0):
        from vllm.v1.metrics.loggers import StatLoggerBase

        capture = self

        class _Logger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
                capture.recorded_at = time.monotonic()
                if scheduler_stats is not None:
                    capture.latest = EngineStats(
                        running=scheduler_stats.num_running_reqs,
                        waiting=scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs,
                        kv_cache_usage=scheduler_stats.kv_cache_usage,
                    )

            def log_engine_initialized(self) -> None:
                pass

        return _Logger(vllm_config, engine_index)


class _HeldTail:
    """The end of an answer that vLLM's detokenizer never releases. While the text so far ends
    in an incomplete UTF-8 character (a byte-level token can hold part of one) it holds back
    everything since the last whole character, and when max_tokens ends the answer there it
    drops that text, whole characters before the broken one included. Here each choice's
    token ids and released text are kept, and a choice that ends by its length with its
    bytes ending mid-character gets the rest of the decoded answer added to its last text,
    the incomplete character as U+FFFD, as the tokenizer decodes it (and as the logprobs'
    texts, joined, spell it). Only when the decoded answer begins with the released text:
    anything else is left as vLLM gave it. vLLM never looked for the stop strings in that
    text: one that ends there ends the answer, as vLLM would have ended it ("stop", the
    answer cut before the string, or after it with include_stop_str_in_output)."""

    def __init__(self, tokenizer: Any, token_bytes, params) -> None:
        self._tokenizer = tokenizer
        self._token_bytes = token_bytes
        self._skip_special = params.skip_special_tokens
        self._spaces = params.spaces_between_special_tokens
        self._stops = [stop for stop in params.stop or () if stop]
        self._include_stop = params.include_stop_str_in_output
        self._ids: dict[int, list[int]] = {}
        self._texts: dict[int, list[str]] = {}

    def settle(self, choice: ChoiceDelta) -> ChoiceDelta:
        ids = self._ids.setdefault(choice.index, [])
        ids.extend(choice.token_ids)
        texts = self._texts.setdefault(choice.index, [])
        texts.append(choice.text)
        if choice.finish_reason != "length" or not _ends_mid_character(self._tail_bytes(ids)):
            return choice
        try:
            answer = self._tokenizer.decode(ids, skip_special_tokens=self._skip_special,
                                            spaces_between_special_tokens=self._spaces)
        except Exception:  # noqa: BLE001 - a tokenizer that cannot: the text as vLLM gave it
            return choice
        released = "".join(texts)
        if len(answer) <= len(released) or not answer.startswith(released):
            return choice
        return self._cut_at_stop(choice, choice.text + answer[len(released):])

    def _cut_at_stop(self, choice: ChoiceDelta, text: str) -> ChoiceDelta:
        """`choice` with `text`, ended at the first stop string that ends past its old text.
        One that begins before it lies within it: vLLM holds back as many characters as the
        longest stop string has, less one, until an answer ends, so they came in this output."""
        first: tuple[int, str] | None = None
        for stop in self._stops:
            at = text.find(stop, max(0, len(choice.text) - len(stop) + 1))
            if at >= 0 and (first is None or at < first[0]):
                first = (at, stop)
        if first is None:
            return replace(choice, text=text)
        at, stop = first
        end = at + len(stop) if self._include_stop else at
        return replace(choice, text=text[:end], finish_reason="stop", stop_reason=stop)

    def _tail_bytes(self, ids: list[int]) -> bytes:
        parts = [self._token_bytes(i) for i in ids[-4:]]  # a character is at most 4 bytes
        return b"".join(p for p in parts if p is not None)


def _ends_mid_character(data: bytes) -> bool:
    """Whether `data` ends in bytes that are no whole UTF-8 character (what vLLM's
    detokenizer holds back: text that decodes to a final U+FFFD)."""
    return data[-8:].decode("utf-8", "replace").endswith("\ufffd")


def token_bytes_of(tokenizer: Any):
    """`f(token_id) -> bytes | None`: the bytes a token stands for, for byte-level BPE
    tokenizers (all of the Qwen-VL family's); a token can be part of a UTF-8 character, which
    its decoded text cannot show. None for ids it does not know and for other tokenizers."""
    from functools import lru_cache

    from server.qwen_vl.tokenizer import bytes_to_unicode

    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    try:
        added = set(tokenizer.get_added_vocab())
    except Exception:  # noqa: BLE001 - a tokenizer without the method: no added tokens known
        added = set()

    @lru_cache(maxsize=1 << 16)
    def token_bytes(token_id: int) -> bytes | None:
        try:
            piece = tokenizer.convert_ids_to_tokens(token_id)
        except Exception:  # noqa: BLE001 - an id past the vocabulary
            return None
        if not piece:
            return None
        if piece in added:
            return piece.encode("utf-8")
        try:
            return bytes(byte_of[ch] for ch in piece)
        except KeyError:  # not a byte-level piece
            return None

    return token_bytes


def _child_pids() -> set[int]:
    import psutil

    try:
        return {p.pid for p in psutil.Process().children()}
    except psutil.Error:
        return set()


def _lower_priority(pids: set[int], nice: int) -> None:
    """Add `nice` to the niceness of the engine core processes' main threads. vLLM's engine
    core polls its workers in a busy loop on that thread; where it shares cores with this
    process and the workers (the CPU build), the lower priority lets HTTP work (probes,
    streaming, new requests) and the model's own compute run first. Linux keeps a nice
    value per thread, so the engine core's I/O threads, started before this call, keep
    their priority: they serialize inputs and outputs on the requests' path."""
    for pid in pids:
        try:
            os.setpriority(os.PRIO_PROCESS, pid, min(19, os.getpriority(os.PRIO_PROCESS, pid) + nice))
        except OSError as exc:  # the process is gone, or we may not change it
            log.warning("could not lower the priority of engine process %d: %s", pid, exc)
    if pids:
        log.info("engine core processes %s run at nice +%d", sorted(pids), nice)


def _split_cores(core_pids: set[int], engine_core_cpus: str = "any") -> tuple[list[int], list[int]] | None:
    """Run this process on the CPUs that vLLM left free of model workers, and the engine core
    processes `core_pids` on `engine_core_cpus`: "any" of our CPUs, "front-end" (this
    process's), or "workers" (the workers'); every thread of each, and threads started later
    inherit the mask.

    The CPU build binds each worker's OpenMP threads to a set of cores and reserves the
    others for the front end, but leaves this process and the engine core free to run
    anywhere: the kernel then also runs them on the workers' cores and the model's step
    waits. Measured on 2 cores (worker bound to core 0), workload (a) at 64 streams:
    46.8-48.6 req/s with this process and the engine core on core 1, 42.4-43.7 without.
    Text only at high rates pays for it ((d) at 64 streams: 254-275 against 283-300 req/s),
    since the front end can no longer borrow the worker's core between short steps; hence
    `--no-pin-front-end`.

    The engine core and its workers take turns (one schedules a step while the other
    waits, each yielding the CPU as it polls), so the engine core does not need cores of its
    own. Measured on 2 cores (docs/benchmarks.md), against "front-end": "workers" raised
    throughput where the front end is the bottleneck (64 streams: 4 pictures reused 163-172
    against 101-127 req/s, text only 196-239 against 174-184) but lowered it at 1 stream
    (text only 15.0-18.9 against 19.2-22.0) and doubled the time to first token of unique
    pictures at 64 streams; "any" (the default) gave most of that gain (4 pictures reused
    151-170 against 128-138 req/s, text only 231-247 against 216-221) with no loss at 1
    stream or for unique pictures.

    Returns (this process's CPUs, the engine core's CPUs), or None (and changes nothing)
    where no worker is bound to a strict subset of our CPUs or none would be left."""
    import psutil

    try:
        me = psutil.Process()
        allowed = set(me.cpu_affinity())
        bound: set[int] = set()
        for child in me.children(recursive=True):
            try:
                cpus = set(child.cpu_affinity())
            except psutil.Error:
                continue
            if cpus < allowed:
                bound |= cpus
    except (psutil.Error, AttributeError):  # no affinity support on this platform
        return None
    front = sorted(allowed - bound)
    if not bound or not front:
        return None
    core = {"any": sorted(allowed), "front-end": front, "workers": sorted(bound)}[engine_core_cpus]
    for pid, cpus in ((me.pid, front), *((p, core) for p in core_pids)):
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:  # the thread ended meanwhile
                pass
    log.info("front end on CPUs %s, engine core on %s, model workers on %s", front, core, sorted(bound))
    return front, core


def _no_op(*args, **kwargs) -> None:
    return None


class _Closed:
    """Stands in for the engine after shutdown: every use fails as a dead engine."""

    errored = True

    def __getattr__(self, name: str):
        raise EngineDeadError("the inference engine was shut down")


def cpu_kv_cache_bytes(settings: Settings, environ: MutableMapping[str, str]) -> int | None:
    """The CPU KV-cache size to hand vLLM as `kv_cache_memory_bytes`, or None where an
    operator's own VLLM_CPU_KVCACHE_SPACE (whole GiB) is to decide. `--kv-cache-space-gib`
    (or QWENVL_KV_CACHE_SPACE_GIB) wins when given: the variable is then removed from
    `environ`, as vLLM's CPU platform lets it override the engine argument."""
    if environ.get("VLLM_CPU_KVCACHE_SPACE") and "kv_cache_space_gib" not in settings.model_fields_set:
        return None
    environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # (also an empty one, which vLLM fails to parse)
    return round(settings.kv_cache_space_gib * 2**30)


class VLLMEngine(Engine):
    """`AsyncLLM` behind the `Engine` interface. Build with `VLLMEngine.load(...)`."""

    def __init__(self, llm, info: ModelInfo, stats: _StatsCapture) -> None:
        self._llm = llm
        self.info = info
        self._stats = stats
        self._token_bytes = token_bytes_of(info.tokenizer)

    @classmethod
    def load(cls, settings: Settings, model: str) -> "VLLMEngine":
        """Load the model and start the engine core (blocking: tens of seconds to minutes)."""
        device = detect_device(settings.device)
        # AsyncLLM hands engine outputs to the request streams in chunks, yielding to the
        # event loop between chunks. vLLM's 128 keeps the loop busy for a whole batch;
        # 8 lets probes and new requests in between (measured, workload (b) at 64 streams
        # on 2 CPU cores: /health p99 166-191 ms -> 32-41 ms, throughput not lower). The
        # price: under text-only overload a lagging stream still sends one write per
        # token, so the backlog sits before first tokens (docs/benchmarks.md).
        os.environ.setdefault("VLLM_V1_OUTPUT_PROC_CHUNK_SIZE", "8")
        from vllm.v1.engine.async_llm import AsyncLLM

        stats = _StatsCapture()
        kv_cache_bytes = cpu_kv_cache_bytes(settings, os.environ) if device == "cpu" else None
        args = engine_args_from_settings(settings, model, device, kv_cache_bytes)
        os.environ[parent_watch.ENV] = str(os.getpid())  # (the engine core stops itself without us)
        vllm_config = _engine_config(args)
        before = _child_pids()
        llm = AsyncLLM.from_vllm_config(vllm_config, stat_loggers=[stats.factory],
                                        enable_log_requests=args.enable_log_requests,
                                        disable_log_stats=args.disable_log_stats)
        core_pids = _child_pids() - before
        nice = settings.engine_nice if settings.engine_nice is not None else (10 if device == "cpu" else 0)
        if nice:
            # Our direct children are the engine core (the scheduler); its workers, which
            # run the model, were started by it before this point and keep our priority.
            _lower_priority(core_pids, nice)
        if settings.pin_front_end if settings.pin_front_end is not None else device == "cpu":
            _split_cores(core_pids, settings.engine_core_cpus)
        model_config = llm.model_config
        model_type = getattr(model_config.hf_config, "model_type", "")
        family = family_of(model_type)
        tokenizer = llm.get_tokenizer()
        image_processor = _image_processor_config(model, settings)
        if (raised := _raised_max_pixels(settings, model)) is not None:
            image_processor["max_pixels"] = raised  # as engine_args_from_settings told vLLM
        if family == "qwen-vl":  # the square every picture is stretched to
            from server.qwen_vl.config import VisualConfig

            visual = getattr(model_config.hf_config, "visual", None)
            image_processor["image_size"] = VisualConfig.from_dict(visual if isinstance(visual, dict) else {}).image_size
        # vLLM matches stop strings against the text it decodes: decoded with special tokens
        # skipped and the grounding tags kept, that is the text the client gets.
        keep_grounding_tags_when_skipping(tokenizer)
        info = ModelInfo(
            family=family,
            max_model_len=model_config.max_model_len,
            tokenizer=tokenizer,
            model_type=model_type,
            image_processor=image_processor,
            stop_token_ids=_chat_stop_ids(family),
            sampling_defaults=_sampling_defaults(model_config),
            vocab_size=model_config.get_vocab_size(),
        )
        log.info("engine ready: %s (%s) on %s, max_model_len=%d", model, info.family, device, info.max_model_len)
        return cls(llm, info, stats)

    async def start(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        from vllm.exceptions import VLLMValidationError

        if self.is_dead:
            raise EngineDeadError("the inference engine stopped")
        llm = self._llm
        prompt: dict[str, Any] = {"prompt_token_ids": request.prompt_token_ids}
        if request.cache_salt:
            prompt["cache_salt"] = request.cache_salt
        if request.images:
            prompt["multi_modal_data"] = {"image": list(request.images)}
            ids = list(request.image_ids)
            if len(ids) == len(request.images) and all(ids):
                # Our content ids spare vLLM hashing every image's pixels (processor
                # cache and prefix-cache keys) on each request.
                prompt["multi_modal_uuids"] = {"image": ids}
                prompt["multi_modal_data"] = {"image": [_as_loaded(im) for im in request.images]}
        try:
            # Expands the image placeholders (runs the HF processor off the event loop), so
            # the true prompt length is known before anything is scheduled.
            processing = asyncio.ensure_future(llm.renderer.process_for_engine_async(prompt, time.time()))
            try:
                engine_input = await asyncio.shield(processing)
            except asyncio.CancelledError:
                # Its processor work goes on in a thread and counts the pictures as sent
                # when it ends; they never will be.
                processing.add_done_callback(self._forget_processed)
                raise
        except (VLLMValidationError, ValueError) as exc:
            log.info("request %s: input rejected: %s", request.request_id, exc)
            raise InvalidRequestError(
                "The images or prompt could not be processed for this model.", param="messages"
            ) from exc
        try:
            params, copies = self._checked_params(request, engine_input)
        except BaseException:
            # Processing told vLLM's processor cache that these pictures went to the engine;
            # they did not, and the next request with them would be sent without their data.
            self._forget_images(engine_input)
            raise
        return _UnsentGuard(self._stream(prompt, engine_input, params, request.request_id, copies),
                            lambda: self._forget_images(engine_input))

    def _checked_params(self, request: GenerationRequest, engine_input) -> tuple[Any, int]:
        """The request's SamplingParams and how many copies of one answer make its n choices
        (n under greedy decoding), once the processed prompt's length is known; raises the
        request's 400 when it cannot run."""
        from vllm.exceptions import VLLMValidationError

        llm = self._llm
        n_prompt = len(engine_input["prompt_token_ids"])
        limit = self.info.max_model_len
        s = request.sampling
        if n_prompt >= limit:
            raise ContextLengthError(
                f"The prompt is {n_prompt} tokens (images included), which leaves no room for an answer "
                f"in this model's context of {limit} tokens. Shorten the messages or send fewer or "
                f"smaller images.",
                param="messages",
            )
        if s.max_tokens is not None:
            max_tokens = s.max_tokens
        else:
            max_tokens = min(limit - n_prompt, s.default_max_tokens or limit)
        if n_prompt + max_tokens > limit:
            raise ContextLengthError(
                f"{s.max_tokens_field} is {max_tokens}, but the prompt already takes {n_prompt} of this "
                f"model's {limit} context tokens; at most {limit - n_prompt} can be generated.",
                param=s.max_tokens_field,
            )
        if s.min_tokens > max_tokens:  # only reachable without max_tokens: the service checks that case
            raise InvalidRequestError(
                f"min_tokens is {s.min_tokens}, but at most {max_tokens} tokens can be generated for "
                f"this request (the model's default length, or the context the prompt leaves); "
                f"lower min_tokens or set max_tokens.",
                param="min_tokens",
            )
        # vLLM refuses n>1 under greedy decoding (temperature below its 1e-5, which includes
        # checkpoints' near-zero defaults); the n answers would be identical anyway, so
        # generate once and fan the deltas out to n choices.
        copies = s.n if s.temperature < _GREEDY_BELOW and s.n > 1 else 1
        try:
            # (ignore_eos: the turn-ending tokens do not stop it either, as vLLM leaves out a
            # checkpoint's extra EOS ids then)
            turn_end = () if s.ignore_eos else self.info.stop_token_ids
            params = self._sampling_params(s, max_tokens, n=1 if copies > 1 else s.n,
                                           stop_token_ids=(*turn_end, *s.stop_token_ids))
        except (VLLMValidationError, ValueError) as exc:
            raise InvalidRequestError(f"Invalid sampling parameters: {_reason(exc)[:300]}") from exc
        self._check_model_runner_limits(params, s)
        if params.structured_outputs is not None:
            # Checked here, so that a schema the engine cannot follow is a 400, not an error
            # event in a stream already begun (vLLM checks it again as the request is added).
            processor = llm.input_processor
            try:
                params.verify(processor.model_config, processor.speculative_config,
                              processor.structured_outputs_config, processor.tokenizer)
            except (VLLMValidationError, ValueError) as exc:
                raise InvalidRequestError(
                    f"The {s.constraint_param} cannot be used: {_grammar_error(exc)}", param=s.constraint_param,
                    code=f"invalid_{s.constraint_param}") from exc
        return params, copies

    def _check_model_runner_limits(self, params, s) -> None:
        """A 400 for what vLLM's GPU model runner (V2) has no room for. It checks these bounds
        as it adds the request to a batch, in the engine core, where a failure is fatal: the
        engine dies, and the server with it. (vLLM's front end checks none of them.)"""
        from vllm import envs
        from vllm.exceptions import VLLMValidationError

        if params.bad_words:
            try:  # (vLLM's rule: each word with and without a leading space, as tokens)
                params.update_from_tokenizer(self._llm.input_processor.tokenizer)
            except (VLLMValidationError, ValueError) as exc:
                raise InvalidRequestError(
                    f"bad_words cannot be used: {_reason(exc)[:200]} (vLLM counts each word, and its spelling "
                    "with a leading space where that tokenizes differently)", param="bad_words") from exc
            total = sum(map(len, params.bad_words_token_ids or ()))
            if total > envs.VLLM_MAX_BAD_WORDS_TOTAL_TOKENS:
                raise InvalidRequestError(
                    f"bad_words come to {total} tokens (each word with and without a leading space); "
                    f"at most {envs.VLLM_MAX_BAD_WORDS_TOTAL_TOKENS} are allowed.", param="bad_words")
        # With min_tokens the stop tokens are masked until then, in a table of 128 per request.
        # vLLM adds the end-of-sequence ids (the tokenizer's, the generation config's) to them
        # later, as it processes the request, ignore_eos or not.
        if s.min_tokens:
            theirs = self._eos_ids() | set(self.info.stop_token_ids)
            if len(params.all_stop_token_ids | theirs) > _MAX_MASKED_STOP_IDS:
                raise InvalidRequestError(
                    f"With min_tokens, at most {_MAX_MASKED_STOP_IDS - len(theirs)} stop_token_ids "
                    f"besides the model's own are allowed.", param="stop_token_ids")

    def _eos_ids(self) -> set[int]:
        """The end-of-sequence ids vLLM adds to every request's stop token ids."""
        ids = set()
        eos = self._llm.renderer.get_eos_token_id()
        if eos is not None:
            ids.add(eos)
        configured = self._llm.input_processor.generation_config_fields.get("eos_token_id")
        if configured is not None:
            ids |= {configured} if isinstance(configured, int) else set(configured)
        return ids

    @staticmethod
    def _sampling_params(s, max_tokens: int, n: int, stop_token_ids: tuple[int, ...] = ()):
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        return SamplingParams(
            n=n,
            max_tokens=max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            min_p=s.min_p,
            stop=s.stop or None,
            stop_token_ids=list(dict.fromkeys(stop_token_ids)) or None,
            include_stop_str_in_output=s.include_stop_str_in_output,
            seed=s.seed,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            repetition_penalty=s.repetition_penalty,
            min_tokens=s.min_tokens,
            ignore_eos=s.ignore_eos,
            logprobs=s.logprobs,
            skip_special_tokens=s.skip_special_tokens,
            logit_bias=s.logit_bias,
            allowed_token_ids=s.allowed_token_ids,
            bad_words=s.bad_words or None,
            structured_outputs=_structured_outputs(s),
            output_kind=RequestOutputKind.DELTA,
        )

    async def _stream(self, prompt, engine_input, params, request_id: str,
                      copies: int) -> AsyncIterator[GenerationChunk]:
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDead

        # vLLM's front end remembers which pictures its engine holds, to send each only once;
        # the two sides can disagree (a request processed but never added, an eviction), and
        # the engine then ends a request whose picture it lacks with "error" before its first
        # token, having told the front end to forget it. Sent again, the data goes along.
        retry = bool(prompt.get("multi_modal_data"))
        answered = False  # (an output came: the request, and its pictures, reached the engine)
        tails = _HeldTail(self.info.tokenizer, self._token_bytes, params)
        try:
            while True:
                missed = False
                # With n > 1 vLLM runs a request per choice, and each reports its miss in an
                # output of its own; only the last one's is `finished`. Held back until then.
                held = []
                # aclosing: closing this stream closes vLLM's, whose GeneratorExit aborts the
                # request then and there rather than whenever the event loop finalizes it.
                async with contextlib.aclosing(self._llm.generate(engine_input, params, request_id)) as outs:
                    async for out in outs:
                        answered = True
                        if retry:
                            if _failed_before_any_token(out):
                                if out.finished:
                                    missed = True
                                    break
                                held.append(out)
                                continue
                            retry = False
                            for earlier in held:
                                yield self._chunk(earlier, copies, tails)
                            held.clear()
                        if out.outputs and out.outputs[0].logprobs is not None and \
                                sum(len(c.token_ids) for c in out.outputs) > LARGE_DELTA_TOKENS:
                            yield await asyncio.to_thread(self._chunk, out, copies, tails)
                        else:
                            yield self._chunk(out, copies, tails)
                if not missed:
                    return
                log.warning("request %s: the engine lacked a picture its front end thought sent; "
                            "sending the request again with its pictures", request_id)
                retry = False
                engine_input = await self._llm.renderer.process_for_engine_async(prompt, time.time())
        except VLLMEngineDead as exc:
            raise EngineDeadError("the inference engine stopped") from exc
        except VLLMValidationError as exc:
            log.info("request %s: rejected by engine: %s", request_id, exc)
            if not answered:  # (refused before it was sent, its pictures with it)
                self._forget_images(engine_input)
            raise InvalidRequestError("The engine rejected the request parameters.") from exc
        except Exception:
            if not answered:
                self._forget_images(engine_input)
            # A request vLLM failed to add (its serializer refusing a value, say) stays
            # registered in its client, counted unfinished for good; aborting it by our id
            # releases it.
            with contextlib.suppress(Exception):
                await self._llm.abort(request_id)
            raise

    def _chunk(self, out, copies: int, tails: _HeldTail | None = None) -> GenerationChunk:
        choices = [self._choice(c) for c in out.outputs]
        if tails is not None:
            choices = [tails.settle(c) for c in choices]
        if copies > 1:
            choices = [replace(c, index=i, copy=i > 0) for c in choices for i in range(copies)]
        return GenerationChunk(
            prompt_tokens=len(out.prompt_token_ids or ()),
            choices=choices,
            finished=out.finished,
            cached_tokens=out.num_cached_tokens or 0,
        )

    def _forget_processed(self, processing: asyncio.Future) -> None:
        if not processing.cancelled() and processing.exception() is None:
            self._forget_images(processing.result())

    def _forget_images(self, engine_input) -> None:
        """Tell vLLM's processor cache that this processed input never reached the engine."""
        cache = self._llm.renderer.mm_processor_cache
        if cache is None:
            return
        for hashes in (engine_input.get("mm_hashes") or {}).values():
            for mm_hash in hashes or ():
                if mm_hash is not None:
                    cache.invalidate(mm_hash)

    def _choice(self, c) -> ChoiceDelta:
        logprobs = None
        if c.logprobs is not None:
            logprobs = []
            token_bytes = self._token_bytes
            for token_id, position in zip(c.token_ids, c.logprobs):
                chosen = position.get(token_id) if position else None
                top = sorted((position or {}).items(), key=lambda item: item[1].rank or 0)
                own = token_bytes(token_id)
                logprobs.append(
                    TokenLogprob(
                        token=_token_text(chosen.decoded_token if chosen else None, own),
                        logprob=_json_logprob(chosen.logprob) if chosen else -9999.0,
                        top=[(_token_text(lp.decoded_token, raw), _json_logprob(lp.logprob), raw)
                             for i, lp in top for raw in (token_bytes(i),)],
                        bytes=own,
                    )
                )
        finish = c.finish_reason
        return ChoiceDelta(
            index=c.index,
            text=c.text,
            token_ids=list(c.token_ids),
            logprobs=logprobs,
            finish_reason=finish,
            stop_reason=c.stop_reason if finish else None,
        )

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    def stats(self) -> EngineStats:
        return self._stats.latest

    @property
    def is_dead(self) -> bool:
        return bool(self._llm.errored)

    async def check_health(self) -> None:
        if self._llm.errored:
            raise EngineDeadError("the inference engine stopped")
        try:
            await self._llm.check_health()
        except Exception as exc:  # vLLM raises its own dead-engine error here
            raise EngineDeadError("the inference engine stopped") from exc

    def num_unfinished_requests(self) -> int:
        return self._llm.get_num_unfinished_requests()

    def last_output_at(self) -> float | None:
        return self._stats.recorded_at

    async def shutdown(self) -> None:
        llm, self._llm = self._llm, _Closed()
        if isinstance(llm, _Closed):
            return
        llm.shutdown()
        # AsyncLLM.__del__ calls shutdown() again; when vLLM's own tasks keep the object
        # alive until interpreter exit, that second call meets torn-down modules and
        # prints a traceback. It has nothing left to do, so make it a no-op.
        llm.shutdown = _no_op
        del llm
        gc.collect()


class _UnsentGuard:
    """The stream `VLLMEngine.start` returns. Processing a request told vLLM's front end that
    its pictures went to the engine; they go only when the stream is first read. A stream
    closed or dropped before that (a deadline or a disconnect between the two) has vLLM's
    cache forget them, or the next request with one of them would be sent without its data
    and pay a failed round trip for it."""

    def __init__(self, stream: AsyncIterator[GenerationChunk], forget) -> None:
        self._stream = stream
        self._forget = forget
        self._begun = False
        self._loop = asyncio.get_running_loop()

    def __aiter__(self) -> "_UnsentGuard":
        return self

    async def __anext__(self) -> GenerationChunk:
        if not self._begun:
            # (set as the read runs, not as it is asked for: a read cancelled before it ran
            # left the generator unstarted, and its pictures unsent)
            self._begun = True
            self._forget = None
        return await self._stream.__anext__()

    async def aclose(self) -> None:
        self._unsent()
        await self._stream.aclose()

    def _unsent(self) -> None:
        forget, self._forget = self._forget, None
        if forget is not None:
            forget()

    def __del__(self) -> None:
        # (a collection can run this on any thread, vLLM's processing thread among them,
        # which changes the same cache: the loop's thread does it)
        forget, self._forget = self._forget, None
        if forget is not None:
            try:
                self._loop.call_soon_threadsafe(forget)
            except RuntimeError:  # the loop has closed: nothing to keep in step
                pass


def _failed_before_any_token(out) -> bool:
    """The engine ended the request with "error" before it produced anything."""
    return bool(out.outputs) and all(c.finish_reason == "error" and not c.token_ids for c in out.outputs)


def _token_text(decoded: str | None, raw: bytes | None) -> str:
    """A token's text in logprobs: vLLM's decoding of it where that is the token's own bytes,
    else its bytes with those that are no whole character escaped (`\\xe5`), so that a client
    keying alternatives by text keeps them apart. vLLM's text is empty for a token that ends
    inside a UTF-8 character, and for one that completes a character begun by the token
    before, it is the whole character: joined, the texts would repeat those earlier bytes."""
    if decoded and (raw is None or decoded.encode("utf-8") == raw):
        return decoded
    if raw:
        return raw.decode("utf-8", "backslashreplace")
    return ""


def _json_logprob(value: float) -> float:
    """A log-probability JSON can carry: -inf (a token the sampler ruled out) or NaN (a model
    gone numerically wrong) as -9999.0, as OpenAI's API writes the former."""
    return value if math.isfinite(value) and value > -9999.0 else -9999.0
