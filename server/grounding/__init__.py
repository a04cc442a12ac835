"""Grounding as data: the boxes a Qwen-VL model writes, parsed into original-image pixels.

The four generations answer "find the banana" in different syntaxes and coordinate frames:

- Qwen-VL: ``<ref>banana</ref><box>(x1,y1),(x2,y2)</box>`` on a 0-1000 grid;
- Qwen2-VL: the same with ``<|object_ref_start|>``/``<|box_start|>`` tokens, 0-1000 grid;
- Qwen2.5-VL: JSON ``{"bbox_2d": [x1, y1, x2, y2], "label": ...}`` in pixels of the image
  after the processor's `smart_resize`;
- Qwen3-VL: the same JSON on a 0-1000 grid.

`parse_grounding` reads any of them (plus points and quads) and returns `GroundingBox` values in
pixels of the original image; `format_boxes` writes boxes back in a family's format. Drawing
lives in `server.grounding.draw` and the command line in `server.grounding.cli`, so importing
this package needs neither Pillow nor anything heavy.
"""

from server.grounding.coords import smart_resize
from server.grounding.format import format_boxes
from server.grounding.parse import parse_grounding
from server.grounding.types import BoxKind, Family, GroundingBox, family_for_model_type

__all__ = [
    "BoxKind",
    "Family",
    "GroundingBox",
    "family_for_model_type",
    "format_boxes",
    "parse_grounding",
    "smart_resize",
]
