"""What each Qwen-VL model family needs from an image before its processor sees it.

The Qwen2-VL family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) resizes with `smart_resize`
(transformers `models/qwen2_vl/image_processing_qwen2_vl.py`): both sides become multiples
of `factor` (patch size x merge size: 28, or 32 for Qwen3-VL) and the area is brought into
[min_pixels, max_pixels]. It raises `ValueError` when the aspect ratio exceeds 200, which
would fail the request inside the engine, so such images are refused here with a 400.
Images smaller than `factor` are left to the processor: its `min_pixels` rule enlarges
them itself in the transformers releases vLLM 0.32 requires (5.16 and later; releases
before mid-2025 raised instead). Enlarging them here as well gave other sizes than the
model's own processor does, and up to 7 times the image tokens for a thin picture.

Qwen-VL (v1) stretches every image to a square (448x448) in its own processor, with a
bicubic resize from the picture as sent. That resize is done here instead, in the decode
pool, with the same operation (so the processor's own resize then has nothing to do): in
the processor it ran on the event loop, 0.7 s for a 7000x7000 picture. Its published
pipeline keeps no transparency: Pillow's `convert("RGB")` drops the alpha channel, where
the Qwen2-VL family composites onto white. Its processor takes any shape, but a picture
over 200:1 says nothing once stretched to a square, and a thin one is costly out of all
proportion to its pixels (1x49,000,000: 3 s to decode, 10 s and 3 GB to resize, from a
69-byte PNG), so it is refused as for the other families.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import ImageError

#: The aspect ratio `smart_resize` accepts (it raises above it).
SMART_RESIZE_MAX_RATIO = 200


@dataclass(frozen=True)
class FamilySpec:
    """Image constraints of one model family.

    factor: side multiple the processor resizes to (None: the family has no such rule).
    max_aspect_ratio: longest/shortest side the processor accepts (None: any).
    default_max_pixels: ceiling on pixels sent to the model when the server sets none
        (the checkpoints' own `max_pixels`; None: no ceiling).
    min_pixels: floor for a per-request or configured ceiling, so that a client asking
        for max_pixels=1 gets the smallest image the model can use, not a 1x1 one.
    low_detail_max_pixels: the ceiling for an image sent with `detail: "low"` (None: the
        family's processor gives every image the same cost, so "low" changes nothing).
    square_side: the side of the square the processor stretches every picture to (Qwen-VL:
        the checkpoint's `visual.image_size`; None: the family keeps the aspect ratio, or
        the side is not known).
    drop_alpha: transparency is dropped as Pillow's `convert("RGB")` drops it, rather than
        composited onto white.
    """

    name: str
    factor: int | None
    max_aspect_ratio: float | None
    default_max_pixels: int | None
    min_pixels: int
    low_detail_max_pixels: int | None = None
    square_side: int | None = None
    drop_alpha: bool = False


#: `detail: "low"` caps a picture at 448x448 pixels: Qwen-VL's own fixed input size, 256
#: visual tokens for Qwen2-VL and Qwen2.5-VL (196 for Qwen3-VL), whatever the upload's size.
LOW_DETAIL_MAX_PIXELS = 448 * 448

_QWEN2 = dict(factor=28, max_aspect_ratio=SMART_RESIZE_MAX_RATIO, default_max_pixels=12_845_056, min_pixels=3136,
              low_detail_max_pixels=LOW_DETAIL_MAX_PIXELS)

FAMILIES: dict[str, FamilySpec] = {
    "qwen-vl": FamilySpec("qwen-vl", factor=None, max_aspect_ratio=SMART_RESIZE_MAX_RATIO, default_max_pixels=None,
                          min_pixels=1, square_side=448, drop_alpha=True),
    "qwen2-vl": FamilySpec("qwen2-vl", **_QWEN2),
    "qwen2.5-vl": FamilySpec("qwen2.5-vl", **_QWEN2),
    # Qwen3-VL: patch 16 x merge 2; its checkpoints ship max_pixels 16777216.
    "qwen3-vl": FamilySpec(
        "qwen3-vl", factor=32, max_aspect_ratio=SMART_RESIZE_MAX_RATIO, default_max_pixels=16_777_216, min_pixels=4096,
        low_detail_max_pixels=LOW_DETAIL_MAX_PIXELS,
    ),
}


def family_spec(family: str, square_side: int | None = None) -> FamilySpec:
    """The spec of `family`; raises ValueError for an unknown name (a configuration error).
    `square_side`: the checkpoint's own square, for a family that stretches to one."""
    try:
        spec = FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(FAMILIES)}") from None
    if square_side is not None and spec.square_side is not None:
        spec = dataclasses.replace(spec, square_side=square_side)
    return spec


def effective_max_pixels(
    spec: FamilySpec, server_ceiling: int | None, requested: int | None, detail: str | None = None
) -> int | None:
    """The pixel ceiling for one image: the server's (or the family default), lowered but
    never raised by the request's `max_pixels` and by `detail: "low"`, and never below the
    family's floor. "high", "original" and "auto" keep the server's ceiling. None: no ceiling."""
    ceiling = server_ceiling if server_ceiling is not None else spec.default_max_pixels
    if detail == "low" and spec.low_detail_max_pixels is not None:
        requested = spec.low_detail_max_pixels if requested is None else min(requested, spec.low_detail_max_pixels)
    if requested is not None:
        ceiling = requested if ceiling is None else min(ceiling, requested)
    if ceiling is not None:
        ceiling = max(ceiling, spec.min_pixels)
    return ceiling


def check_shape(spec: FamilySpec, width: int, height: int) -> None:
    """Raise a 400 `invalid_image` when the family's processor would refuse this shape."""
    if spec.max_aspect_ratio is None:
        return
    if max(width, height) > spec.max_aspect_ratio * min(width, height):
        raise ImageError(
            f"The image is {width}x{height} pixels; its aspect ratio exceeds "
            f"{spec.max_aspect_ratio:g}:1, the most this model accepts. Crop or pad the image "
            "to a less elongated shape."
        )


def target_size(spec: FamilySpec, width: int, height: int, max_pixels: int | None) -> tuple[int, int]:
    """The size to resize a (width, height) image to before it goes to the model.

    A family that stretches every picture to a square gets that square, unless a ceiling
    below it asks for less detail (the picture is then downscaled to the ceiling, and the
    processor stretches that). Otherwise:
    downscales (keeping the aspect ratio) so that width*height <= max_pixels; never
    upscales (the processor enlarges small images itself). The result never has an aspect
    ratio above the family's limit, even after rounding. Call `check_shape` first.

    A downscaled picture of a family with a `factor` gets the size `smart_resize` would give
    it (sides multiples of `factor`, area at most `max_pixels`): the model's processor then
    keeps it as it is. Scaled to the ceiling alone, the processor would round the sides to
    the nearest multiple, up as often as down, and the picture could cost more tokens than
    the ceiling allows (a 448x448 ceiling: 252 image tokens for a 700x560 upload, where the
    processor's own 448x448 limit gives 238).
    """
    side = spec.square_side
    if side is not None and (max_pixels is None or max_pixels >= side * side):
        return side, side
    w, h = width, height
    if max_pixels is not None and w * h > max_pixels:
        scale = math.sqrt(max_pixels / (w * h))
        if spec.factor is None:
            w, h = max(1, math.floor(w * scale)), max(1, math.floor(h * scale))
        else:
            f = spec.factor
            w, h = max(f, round(w / f) * f), max(f, round(h / f) * f)
            if w * h > max_pixels:
                w = max(f, math.floor(width * scale / f) * f)
                h = max(f, math.floor(height * scale / f) * f)
            # A thin picture's short side stays one patch (f) however small the scale, so its
            # long side takes what the ceiling leaves (3000x16 under 20,000 pixels: 608x32,
            # not 1920x32, which was more than the picture cost with no ceiling at all).
            if w * h > max_pixels:
                if h == f:
                    w = max(f, max_pixels // (f * f) * f)
                elif w == f:
                    h = max(f, max_pixels // (f * f) * f)
    if spec.max_aspect_ratio is not None:
        # Rounding a short side down can push a ratio just under the limit over it. On the
        # processor's grid the long side gives way (to a multiple of `factor`, the area
        # still under the ceiling); without one the short side grows by the few pixels needed.
        limit = spec.max_aspect_ratio
        if spec.factor is not None and max(w, h) > min(w, h) * limit:
            f = spec.factor
            if w > h:
                w = max(f, math.floor(h * limit / f) * f)
            else:
                h = max(f, math.floor(w * limit / f) * f)
        elif w > h * limit:
            h = math.ceil(w / limit)
        elif h > w * limit:
            w = math.ceil(h / limit)
    return w, h
