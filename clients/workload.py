"""What the load generator sends: pictures, prompts and request bodies, all made up front.

Bodies are built and JSON-encoded before the clock starts, so the measured window holds
only network and server time. Everything is deterministic in `seed`: the same workload
sent to two servers is byte for byte the same. Images are synthetic JPEG/PNG pictures
(smooth shapes plus mild noise, so they compress like photographs, not like flat colour).
"""

from __future__ import annotations

import base64
import io
import json
import random
import threading
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image

ImageMode = Literal["none", "data", "http"]
IMAGE_MODES: tuple[str, ...] = ("none", "data", "http")

#: Words prompts are made of (each is one or two tokens for Qwen tokenizers).
_WORDS = (
    "image picture photo scene object person animal colour light shadow left right top "
    "bottom small large near far street house tree water sky road car table window door "
    "describe count find where what which show list name detail"
).split()

_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
_SUFFIX = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def synthetic_image(width: int, height: int, seed: int, fmt: str = "JPEG", quality: int = 85) -> bytes:
    """An encoded RGB picture of `width` x `height`, the same bytes for the same arguments
    and different content for different seeds. Raises ValueError for a non-positive size
    or a format outside JPEG, PNG, WEBP."""
    if width < 1 or height < 1:
        raise ValueError("image size must be positive")
    fmt = fmt.upper()
    if fmt not in _MIME:
        raise ValueError(f"unsupported image format {fmt!r}; choose from {', '.join(_MIME)}")
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.empty((height, width, 3), np.float32)
    for c in range(3):
        fx, fy, phase = rng.uniform(0.5, 6.0), rng.uniform(0.5, 6.0), rng.uniform(0, 2 * np.pi)
        pixels[..., c] = 127 + 90 * np.sin(2 * np.pi * (fx * x / width + fy * y / height) + phase)
    for _ in range(6):  # a few solid blocks: edges, as in real scenes
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        pixels[y0 : y0 + height // 5, x0 : x0 + width // 5] = rng.uniform(0, 255, 3)
    pixels += rng.normal(0, 12, pixels.shape)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": quality} if fmt != "PNG" else {}))
    return buf.getvalue()


def data_url(raw: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}"


@dataclass(frozen=True)
class WorkloadSpec:
    """The shape of the requests of one run.

    `images`: none (text only), data (base64 data URLs) or http (URLs on the local image
    server). `repeat_share`: the share of image slots filled from a pool of `pool_size`
    pictures (the rest are unique to their request). `prompt_words`: words of text added to
    each prompt (about as many tokens). `max_tokens` with `fixed_output` sets ignore_eos and
    min_tokens, so every request generates exactly that many tokens. `temperature` 0 is
    greedy; random-weight models with a vocabulary larger than their tokenizer can then
    repeat a token that prints nothing, so use 1.0 for those.
    """

    model: str
    images: ImageMode = "data"
    images_per_request: int = 1
    image_width: int = 448
    image_height: int = 448
    image_format: str = "JPEG"
    repeat_share: float = 0.0
    pool_size: int = 4
    prompt_words: int = 32
    max_tokens: int = 16
    fixed_output: bool = True
    temperature: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.images not in IMAGE_MODES:
            raise ValueError(f"images must be one of {', '.join(IMAGE_MODES)}")
        if not 0.0 <= self.repeat_share <= 1.0:
            raise ValueError("repeat_share must be within 0..1")
        if self.images != "none" and self.images_per_request < 1:
            raise ValueError("images_per_request must be at least 1 with images")
        if self.repeat_share > 0 and self.pool_size < 1:
            raise ValueError("pool_size must be at least 1 when images repeat")
        if self.max_tokens < 1 or self.prompt_words < 0:
            raise ValueError("max_tokens must be positive and prompt_words non-negative")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError("temperature must be within 0..2")


@dataclass
class BuiltWorkload:
    """Encoded request bodies, and the pictures the image server must serve (path -> bytes
    and content type) for `images="http"`."""

    bodies: list[bytes]
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    unique_images: int = 0


def build_workload(spec: WorkloadSpec, count: int, image_base_url: str | None = None,
                   cancel: threading.Event | None = None) -> BuiltWorkload:
    """`count` request bodies for `spec`. With `images="http"`, `image_base_url` (e.g.
    `http://127.0.0.2:8123`) is where the files will be served. Setting `cancel` (from
    another thread) stops the work early: fewer bodies come back. Raises ValueError when
    the base URL is missing for http images."""
    if spec.images == "http" and not image_base_url:
        raise ValueError("http images need image_base_url")
    rng = random.Random(spec.seed)
    mime, suffix = _MIME[spec.image_format.upper()], _SUFFIX[spec.image_format.upper()]
    made: dict[int, tuple[str, bytes]] = {}  # image seed -> (name, bytes)

    def picture(image_seed: int) -> str:
        if image_seed not in made:
            raw = synthetic_image(spec.image_width, spec.image_height, image_seed, spec.image_format)
            made[image_seed] = (f"/img/{image_seed}.{suffix}", raw)
        name, raw = made[image_seed]
        return data_url(raw, mime) if spec.images == "data" else f"{image_base_url}{name}"

    # Image seeds: the pool owns the first pool_size seeds of this workload, unique
    # pictures the following ones; spaced by workload seed so workloads never share.
    base = spec.seed * 1_000_003
    next_unique = base + spec.pool_size
    bodies = []
    for i in range(count):
        if cancel is not None and cancel.is_set():
            break
        parts: list[dict] = []
        if spec.images != "none":
            for _ in range(spec.images_per_request):
                if rng.random() < spec.repeat_share:
                    url = picture(base + rng.randrange(spec.pool_size))
                else:
                    url = picture(next_unique)
                    next_unique += 1
                parts.append({"type": "image_url", "image_url": {"url": url}})
        text = f"Request {spec.seed}-{i}: " + " ".join(rng.choice(_WORDS) for _ in range(spec.prompt_words))
        content: str | list[dict] = text if not parts else [*parts, {"type": "text", "text": text}]
        bodies.append(json.dumps(_body(spec, content)).encode())
    files = {name: (raw, mime) for name, raw in made.values()} if spec.images == "http" else {}
    return BuiltWorkload(bodies, files, unique_images=len(made))


def _body(spec: WorkloadSpec, content: str | list[dict]) -> dict:
    body: dict = {
        "model": spec.model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": spec.max_tokens,
        "temperature": spec.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if spec.fixed_output:
        body["ignore_eos"] = True
        body["min_tokens"] = spec.max_tokens
    return body
