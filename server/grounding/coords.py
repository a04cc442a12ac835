"""Coordinate frames of the Qwen-VL families and the mapping to and from original pixels.

- Qwen-VL, Qwen2-VL and Qwen3-VL write coordinates on a 0-1000 grid relative to the image
  (Qwen-VL README: "normalized values in the range [0, 1000)"; its tokenizer's drawing helper
  maps back with ``x / 1000 * width``; for Qwen3-VL a maintainer states the relative
  coordinates are normalised on the original width and height, QwenLM/Qwen3-VL#1659).
- Qwen2.5-VL writes absolute pixels of the image its processor resized with `smart_resize`
  (factor 28 = patch 14 x merge 2). The cookbook maps back with ``x / resized_w * width``.

Mapping chooses the nearest pixel and clamps to the image, so a model's ``1000`` or a value
past the resized edge lands on the image border instead of outside it.
"""

from __future__ import annotations

import math

from server.grounding.types import Family

RELATIVE_GRID = 1000
"""Extent of the 0-1000 grid used by every family but Qwen2.5-VL."""

QWEN2_5_VL_FACTOR = 28
"""Qwen2.5-VL resizes to multiples of patch size 14 x spatial merge 2."""

DEFAULT_MIN_PIXELS = 56 * 56
"""`min_pixels` of the Qwen2.5-VL checkpoints' preprocessor_config.json (3136)."""

DEFAULT_MAX_PIXELS = 16384 * 28 * 28
"""`max_pixels` of the Qwen2.5-VL checkpoints' preprocessor_config.json (12,845,056).

Not transformers' class default (1280 * 28 * 28): vLLM runs the processor with the
checkpoint's config, and the cookbook's outputs (a 4080x3072 photo answered with y up to 1900)
only fit this value.
"""


def smart_resize(
    height: int,
    width: int,
    *,
    factor: int = QWEN2_5_VL_FACTOR,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """The ``(height, width)`` the Qwen2-VL-style image processor resizes an image to.

    Same arithmetic, operation for operation, as `smart_resize` in transformers'
    ``models/qwen2_vl/image_processing_qwen2_vl.py`` (so float rounding agrees): both sides
    rounded to a multiple of `factor`, then scaled down (floor) if the area exceeds
    `max_pixels` or up (ceil) if it is below `min_pixels`, keeping the aspect ratio.

    Unlike transformers it does not refuse aspect ratios above 200 (the processor would have
    refused such an image, so no answer about one exists; computing something keeps parsing
    total). Raises ValueError for non-positive sizes or pixel bounds, which are caller bugs.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if factor <= 0 or min_pixels < 0 or max_pixels <= 0:
        raise ValueError("factor and max_pixels must be positive, min_pixels non-negative")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    # An image thinner than factor/2 with min_pixels 0 would round to 0; keep one patch row.
    return max(h_bar, factor), max(w_bar, factor)


def model_frame(
    family: Family,
    model_size: tuple[int, int],
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> tuple[int, int]:
    """``(width, height)`` of the frame the model's coordinates live in.

    `model_size` is ``(width, height)`` of the image as handed to the model's processor (the
    original, unless the server downscaled it first). It only matters for Qwen2.5-VL; the
    relative families always answer on a 1000 x 1000 grid.
    """
    if family.relative_grid:
        return RELATIVE_GRID, RELATIVE_GRID
    width, height = model_size
    resized_h, resized_w = smart_resize(
        height,
        width,
        min_pixels=DEFAULT_MIN_PIXELS if min_pixels is None else min_pixels,
        max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels,
    )
    return resized_w, resized_h


def to_pixel(value: float, frame_extent: int, image_extent: int) -> int:
    """Map one coordinate from the model frame to the nearest original pixel edge, clamped to
    ``[0, image_extent]``. `value` must be finite."""
    scaled = value * image_extent / frame_extent
    # Clamp before rounding: a model may write 10**30, and floor() of an inf would raise.
    scaled = min(max(scaled, 0.0), float(image_extent))
    return math.floor(scaled + 0.5)


def to_model(value: float, frame_extent: int, image_extent: int) -> int:
    """Inverse of `to_pixel`: an original-pixel coordinate to the nearest integer of the model
    frame (what the model would write), clamped to ``[0, frame_extent]``."""
    scaled = value * frame_extent / image_extent
    scaled = min(max(scaled, 0.0), float(frame_extent))
    return math.floor(scaled + 0.5)
