"""The grounding package's data types: model families and parsed boxes.

Kept free of Pillow and of the parsers so that importing the types (for a response schema, say)
costs nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Literal

BoxKind = Literal["box", "quad", "point"]


class Family(enum.StrEnum):
    """A Qwen-VL generation; it decides the coordinate frame of the boxes the model writes.

    - ``qwen-vl``, ``qwen2-vl``, ``qwen3-vl``: a 0-1000 grid relative to the image's width and
      height, whatever size the image had when the model saw it.
    - ``qwen2.5-vl``: absolute pixels of the image *after* the processor's `smart_resize`
      (see `server.grounding.coords`).

    The value is the spelling used on the command line and in JSON.
    """

    QWEN_VL = "qwen-vl"
    QWEN2_VL = "qwen2-vl"
    QWEN2_5_VL = "qwen2.5-vl"
    QWEN3_VL = "qwen3-vl"

    @property
    def relative_grid(self) -> bool:
        """True when the model writes coordinates on the 0-1000 grid (every family but 2.5)."""
        return self is not Family.QWEN2_5_VL


# Hugging Face `model_type` values of each generation's config.json.
_MODEL_TYPES = {
    "qwen": Family.QWEN_VL,
    "qwen2_vl": Family.QWEN2_VL,
    "qwen2_5_vl": Family.QWEN2_5_VL,
    "qwen3_vl": Family.QWEN3_VL,
    "qwen3_vl_moe": Family.QWEN3_VL,
}


def family_for_model_type(model_type: str) -> Family | None:
    """The family of a checkpoint from its config's ``model_type``; None when it is not one."""
    return _MODEL_TYPES.get(model_type)


@dataclass(frozen=True, slots=True)
class GroundingBox:
    """One grounded region found in a model answer.

    Attributes:
        phrase: the referring phrase (``<ref>``, ``label`` ...), stripped of surrounding
            whitespace; None when the model gave none.
        box: ``(x1, y1, x2, y2)`` in pixels of the *original* image ``image_index``, with
            ``0 <= x1 <= x2 <= width`` and ``0 <= y1 <= y2 <= height`` (edges, as in a PIL crop
            box). Corners the model wrote swapped are put in order; values outside the image
            are clamped to it. A point is the degenerate box ``(x, y, x, y)``; a quad is the
            axis-aligned box around its four points.
        model_box: the numbers exactly as the model wrote them, in its own frame and order
            (4 for a box, 2 for a point, 8 for a quad).
        image_index: index into the request's images (in order of appearance).
        kind: ``"box"``, ``"quad"`` or ``"point"``.
        points: the points in original pixels, clamped: the four corners of a quad, the
            single point of a point, empty for a box.
    """

    phrase: str | None
    box: tuple[int, int, int, int]
    model_box: tuple[float, ...]
    image_index: int
    kind: BoxKind = "box"
    points: tuple[tuple[int, int], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict. Whole numbers in ``model_box`` (up to 2**53) come out as ints,
        so a model's ``536`` stays ``536`` rather than ``536.0``. ``points`` is present for quads and points.
        """
        out: dict[str, Any] = {
            "phrase": self.phrase,
            "kind": self.kind,
            "box": list(self.box),
            "model_box": [_json_number(v) for v in self.model_box],
            "image_index": self.image_index,
        }
        if self.kind != "box":
            out["points"] = [list(p) for p in self.points]
        return out


def _json_number(value: float) -> int | float:
    # Only where the int is exact in every JSON reader (2**53): 1e308 stays 1e308, not a
    # 309-digit integer.
    return int(value) if float(value).is_integer() and abs(value) <= 2**53 else value
