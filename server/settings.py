"""The one settings object. Every option is a field here; `qwen-vl-serve` flags and
`QWENVL_*` environment variables both map onto it (flags win over the environment).

List-valued options accept comma-separated strings in the environment
(`QWENVL_API_KEYS=a,b`) and repeated or comma-separated flags on the command line.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

CSVList = Annotated[list[str], NoDecode]

ENV_PREFIX = "QWENVL_"
# QWENVL_* names that deploy files read, not the server: compose's .env (host port, models
# directory and name) and deploy/install.sh.
DEPLOY_ONLY_ENV = frozenset({
    "QWENVL_HTTP_PORT", "QWENVL_MODELS_DIR", "QWENVL_MODEL_NAME",
    "QWENVL_INSTALL_EXTRAS", "QWENVL_SKIP_SYSTEM_PACKAGES",
})


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        # (after the environment's own: QWENVL_API_KEYS wins over the singular)
        return (init_settings, env_settings, _SingularKeyVariable(settings_cls), dotenv_settings,
                file_secret_settings)
    _file_keys: list[str] = PrivateAttr(default_factory=list)  # from api_key_file, read once

    # --- model and engine -------------------------------------------------------------
    model: str | None = Field(
        None,
        description="Checkpoint directory or hub id. Without it a tiny random-weight "
        "checkpoint is generated and served on CPU (a demo, its output is gibberish).",
    )
    served_model_name: str | None = Field(
        None, description="Model name clients send and /v1/models lists (default: --model; "
        "qwen-vl-tiny for the generated demo model)."
    )
    tokenizer: str | None = Field(None, description="Tokenizer path or id (default: the model).")
    revision: str | None = Field(None, description="Model revision on the hub.")
    tiny_arch: Literal["qwen-vl", "qwen2-vl", "qwen2.5-vl", "qwen3-vl"] = Field(
        "qwen-vl", description="Architecture of the generated demo model when --model is absent."
    )
    tiny_model_dir: Path = Field(
        Path.home() / ".cache" / "qwen-vl-serve" / "tiny",
        description="Where the demo checkpoint is written.",
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto: CUDA when a GPU is visible, else CPU."
    )
    dtype: Literal["auto", "bfloat16", "float16", "half", "float32", "float"] = Field(
        "auto", description="Weights and activations dtype (auto, bfloat16, float16, float32).")
    max_model_len: int | None = Field(None, ge=16, description="Context length (default: from the model config).")
    max_num_seqs: int | None = Field(None, ge=1, description="Sequences batched at once by the engine (default: vLLM's).")
    max_num_batched_tokens: int | None = Field(None, ge=16, description="Tokens per engine step (default: vLLM's).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of GPU memory vLLM may use.")
    engine_nice: int | None = Field(
        None, ge=0, le=19,
        description="Nice value added to the engine core process, vLLM's scheduler (default: 10 on "
        "CPU, where its busy polling shares cores with the HTTP front end and the model "
        "workers; 0 on GPU). The workers keep the server's priority.",
    )
    pin_front_end: bool | None = Field(
        None,
        description="Keep this process (HTTP, image decoding) and the engine core off the cores "
        "vLLM binds its model workers to, where it binds them (the CPU build; default: on there). "
        "Otherwise the kernel also runs them on the workers' cores, taking time from the model.",
    )
    engine_core_cpus: Literal["any", "front-end", "workers"] = Field(
        "any",
        description="With --pin-front-end, where the engine core (vLLM's scheduler) runs: on any "
        "core (the kernel places it), on this process's cores, or on the model workers' cores. "
        "'any' was the fastest or level in every workload measured on 2 cores (CPU build; "
        "see docs/benchmarks.md).",
    )
    kv_cache_space_gib: float = Field(
        1, gt=0, le=4096, description="CPU only: paged KV-cache size in GiB; fractions too (0.25 "
        "holds 256K tokens of the generated demo model; the cache is zeroed at startup, "
        "seconds per GiB). Wins over vLLM's VLLM_CPU_KVCACHE_SPACE when given; without "
        "it, that variable decides when set."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per replica (vLLM tensor parallelism).")
    pipeline_parallel_size: int = Field(1, ge=1, description="Pipeline stages (vLLM pipeline parallelism).")
    distributed_executor_backend: str | None = Field(None, description="mp or ray (multi-node).")
    enforce_eager: bool | None = Field(
        None, description="Disable CUDA graphs / compilation (default: on for CPU, off for GPU)."
    )
    enable_prefix_caching: bool | None = Field(None, description="vLLM automatic prefix caching (default: vLLM's).")
    limit_mm_per_prompt: int = Field(4, ge=0, description="Most images in one request.")
    mm_processor_cache_type: Literal["lru", "shm"] | None = Field(
        None, description="vLLM's cache of preprocessed images: lru (vLLM's default) or shm.",
    )
    mm_processor_cache_gb: float | None = Field(
        None, ge=0, description="Size of vLLM's cache of preprocessed images, in GiB (vLLM's default: 4; "
        "held by the engine core, the server keeping only its keys; 0: off).",
    )
    logits_processors: CSVList = Field(
        default_factory=list,
        description="vLLM logits processors to load into the engine, as package.module:Class "
        "(vLLM's --logits-processors); they see every request (this API passes them no "
        "per-request arguments).",
    )
    generation_config: str = Field(
        "auto",
        description="Sampling defaults for fields a request leaves out (temperature, top_p, top_k, "
        "min_p, repetition/presence/frequency penalties, max tokens): 'auto' takes them from the "
        "checkpoint's generation_config.json, as vLLM's server does; 'vllm' uses neutral ones "
        "(temperature 1, no top-p/top-k); or a directory holding a generation_config.json.",
    )
    seed: int = Field(0, description="Engine seed.")
    trust_remote_code: bool = Field(
        False, description="Execute Python files shipped with a checkpoint. Never needed for Qwen-VL."
    )
    download_dir: str | None = Field(None, description="Hub download cache directory.")

    # --- HTTP ----------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(8000, ge=0, le=65535, description="Bind port.")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field(
        "info", description="Log level.")
    root_path: str = Field("", description="ASGI root_path when served under a prefix.")

    # --- images --------------------------------------------------------------------------
    image_allowed_domains: CSVList = Field(
        default_factory=list, description="If set, only these hosts (and their subdomains) may serve image URLs."
    )
    image_denied_domains: CSVList = Field(default_factory=list, description="Hosts never fetched.")
    image_allow_networks: CSVList = Field(
        default_factory=list,
        description="CIDRs exempt from the public-address rule (e.g. 10.0.0.0/8 for an internal CDN).",
    )
    image_max_bytes: int = Field(20 * 1024 * 1024, ge=1, description="Largest image body, fetched or base64.")
    image_fetch_timeout: float = Field(10.0, gt=0, description="Total seconds to fetch one image.")
    image_connect_timeout: float = Field(3.0, gt=0, description="Seconds to connect to an image host.")
    image_max_redirects: int = Field(3, ge=0, description="Redirect hops followed per image URL.")
    image_fetch_concurrency: int = Field(32, ge=1, description="Image fetches in flight at once.")
    allowed_local_media_path: Path | None = Field(
        None, description="Directory that file: image URLs may read from (off by default)."
    )
    image_max_input_pixels: int = Field(
        50_000_000, ge=1, description="Largest image (width*height) accepted for decoding."
    )
    image_max_frames: int = Field(1000, ge=1, description="Most frames an animated image may have.")
    image_max_pixels: int | None = Field(
        None, ge=1, description="Ceiling on pixels per image sent to the model; replaces the "
        "checkpoint's own max_pixels (Qwen2-VL family), raising the engine processor's bound "
        "when above it. Per-request max_pixels and detail can only lower it."
    )
    image_decode_workers: int = Field(2, ge=1, description="Threads decoding and resizing images.")
    image_cache_size: int = Field(256, ge=0, description="Decoded images kept in the cache, within 1 GiB of "
                                  "pixels in all (0: off).")
    image_url_cache_ttl: float = Field(300.0, ge=0, description="Seconds a fetched URL stays cached.")

    # --- admission, limits and operations ----------------------------------------------------
    api_keys: CSVList = Field(default_factory=list, description="Accepted Bearer keys.")
    api_key_file: Path | None = Field(None, description="File with one API key per line.")
    auth_health_endpoints: bool = Field(
        False, description="Require a key on /health and /ready too (off: probes need none)."
    )
    auth_metrics: bool = Field(True, description="Require a key on /metrics when keys are set.")
    max_concurrent_requests: int = Field(256, ge=1, description="Requests processed at once.")
    max_queued_requests: int = Field(512, ge=0, description="Requests waiting beyond that; more get 429.")
    drain_timeout: float = Field(30.0, ge=0, description="Seconds in-flight work may finish after SIGTERM.")
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1, description="Largest request body.")
    max_body_bytes_held: int = Field(
        1024 * 1024 * 1024, ge=1, description="Request-body bytes read and not yet parsed, over "
        "all requests at once, beyond each body's first MiB; a request that would go over "
        "gets a 429. At least --max-request-bytes.")
    max_messages: int = Field(256, ge=1, description="Most messages in one request.")
    max_content_parts: int = Field(
        1024, ge=1, description="Most content parts (text, image and refusal parts, and "
        "assistant tool calls, together) over all of one request's messages.")
    max_n: int = Field(8, ge=1, description="Largest n.")
    request_timeout: float = Field(600.0, gt=0, description="Per-request deadline in seconds.")
    engine_stall_timeout: float = Field(
        300.0, ge=0, description="Seconds the engine may hold requests without handing out any "
        "output (not one engine step) before it is taken for hung (a stuck device, a frozen "
        "process): open requests then fail with a 503, /health and /ready turn 503, and the "
        "process exits 1 for its supervisor to restart it. Raise it for a model whose single "
        "steps take minutes; 0 turns the check off.")
    send_timeout: float = Field(
        60.0, gt=0, description="Longest wait, in seconds, for a client to take the next part of "
        "a response; a client that stops reading then loses the connection (and its slot)."
    )
    body_read_timeout: float = Field(
        30.0, gt=0, description="Longest wait, in seconds, for the next part of a request body "
        "(a client that stops sending one gets a 408 and loses the connection)."
    )
    body_timeout: float = Field(
        300.0, gt=0, description="Longest time, in seconds, a whole request body may take to arrive "
        "(the largest body at 0.2 MB/s; a client still sending then gets a 408 and loses the connection)."
    )
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, description="Largest request head (request line and headers), in bytes; "
        "a larger one gets a 431 and loses the connection."
    )
    header_timeout: float = Field(
        30.0, gt=0, description="Longest time, in seconds, a request's headers may take to arrive "
        "(and a new connection to start sending them); then the connection closes, with a 408 "
        "if any of them had arrived."
    )
    sse_keepalive_interval: float = Field(
        15.0, gt=0, description="Seconds between SSE comments while a stream waits for tokens (from when "
        "the stream starts: the request admitted, its images loaded, the engine holding it)."
    )
    cors_allow_origins: CSVList = Field(default_factory=list, description="CORS origins (off when empty).")
    docs: bool = Field(
        True, description="Serve the API's interactive docs and schema (/docs, /redoc, /openapi.json; "
        "behind the API key when keys are set). --no-docs: not at all."
    )
    grounding: bool = Field(True, description="Parse grounding boxes into the response by default.")

    @field_validator(
        "image_allowed_domains",
        "image_denied_domains",
        "image_allow_networks",
        "logits_processors",
        "api_keys",
        "cors_allow_origins",
        mode="before",
    )
    @classmethod
    def _split_csv(cls, value: object) -> object:
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)):
            return [part.strip() for item in value for part in str(item).split(",") if part.strip()]
        return value

    @field_validator("image_allowed_domains", "image_denied_domains")
    @classmethod
    def _domain_names(cls, value: list[str]) -> list[str]:
        from server.images.policy import normalise_domain

        for name in value:
            normalise_domain(name)  # (refused here, at start-up, rather than when first used)
        return value

    @field_validator("image_allow_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        import ipaddress

        for net in value:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                # (refused here: later, the first image loader built would fail, once the
                # engine had loaded, and leave the server loading for good)
                raise ValueError(f"{net!r} is not an IP network (write it as a CIDR, like 10.0.0.0/8)") from None
        return value

    @field_validator("allowed_local_media_path")
    @classmethod
    def _existing_directory(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"{str(value)!r} is not a directory (every file: image URL would fail)")
        return value

    @field_validator("generation_config")
    @classmethod
    def _generation_config(cls, value: str) -> str:
        if value not in ("auto", "vllm") and not (Path(value) / "generation_config.json").is_file():
            raise ValueError(f"'auto', 'vllm' or a directory holding a generation_config.json; "
                             f"{value!r} has none")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_case_level(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("logits_processors")
    @classmethod
    def _qualified_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", name):
                raise ValueError(f"{name!r} is not package.module:Class")
        return value

    @model_validator(mode="after")
    def _body_budget_fits_a_body(self) -> Settings:
        if self.max_body_bytes_held < self.max_request_bytes:
            raise ValueError(
                f"--max-body-bytes-held ({self.max_body_bytes_held}) is below --max-request-bytes "
                f"({self.max_request_bytes}): a request of the largest size allowed could never be read")
        return self

    @model_validator(mode="after")
    def _read_api_key_file(self) -> Settings:
        # Read here, when the settings are made (the command line exits with status 2): a
        # file that cannot be read failed later, inside the app, where uvicorn took it for an
        # app without lifespan and served 500s with no model; an empty one (a secret mounted
        # without its value) left the API open without a word.
        path = self.api_key_file
        if path is None:
            return self
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
            raise ValueError(f"cannot read the API key file {path}: {reason}") from None
        keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        if not keys:
            raise ValueError(f"the API key file {path} holds no keys (only blank lines or # comments); "
                             "refusing to serve without the authentication it asks for")
        self._file_keys = keys
        return self

    @model_validator(mode="after")
    def _keys_given_are_keys(self) -> Settings:
        # (after the key file is read) An empty value (a secret's variable set without its
        # value, `--api-key ""`) would otherwise leave the API open without a word, as an
        # empty key file would.
        if "api_keys" in self.model_fields_set and not self.all_api_keys():
            raise ValueError("API keys were given but all of them are empty (QWENVL_API_KEYS, "
                             "QWENVL_API_KEY or --api-key); refusing to serve without the "
                             "authentication they ask for")
        return self

    def all_api_keys(self) -> list[str]:
        """Keys from --api-key and from --api-key-file (blank lines and # comments ignored)."""
        return [*self.api_keys, *self._file_keys]


#: The singular spelling of QWENVL_API_KEYS (vLLM's own variable is VLLM_API_KEY), read as
#: it: misspelt, the key variable would leave the API open with only a warning.
SINGULAR_KEY_ENV = ENV_PREFIX + "API_KEY"


class _SingularKeyVariable(PydanticBaseSettingsSource):
    """`QWENVL_API_KEY` as the value of `api_keys`, where QWENVL_API_KEYS is not set."""

    def get_field_value(self, field, field_name):  # (unused: __call__ reads the one variable)
        return None, field_name, False

    def __call__(self) -> dict[str, str]:
        for name, value in os.environ.items():
            if name.upper() == SINGULAR_KEY_ENV:  # (matched as the other variables are)
                return {"api_keys": value}
        return {}


def unknown_env_names(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """The `QWENVL_*` variables in `environ` that are no setting, each with the closest
    setting's variable (or None). Settings ignore unknown variables, so a misspelt one in a
    ConfigMap or .env would otherwise leave its option at the default without a word."""
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | {SINGULAR_KEY_ENV}
    unknown = []
    for name in sorted(environ):
        upper = name.upper()  # pydantic-settings matches case-insensitively
        if upper.startswith(ENV_PREFIX) and upper not in known and upper not in DEPLOY_ONLY_ENV:
            close = difflib.get_close_matches(upper, sorted(known), n=1, cutoff=0.8)
            unknown.append((name, close[0] if close else None))
    return unknown
