"""Drawing parsed boxes and their phrases onto the image they refer to."""

from __future__ import annotations

import colorsys
from collections.abc import Iterable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from server.grounding.fonts import Font, load_font
from server.grounding.types import GroundingBox

# Well-separated colours (Tableau 10, then brighter companions); phrases beyond these get
# hues spread by the golden angle, which never repeats.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (255, 215, 0),
    (0, 0, 255),
    (255, 0, 255),
    (0, 128, 128),
    (128, 0, 0),
    (0, 255, 127),
)
_MAX_LABEL_CHARS = 200


def colour_for(index: int) -> tuple[int, int, int]:
    """The `index`-th distinct colour."""
    if index < len(PALETTE):
        return PALETTE[index]
    hue = (index * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


def assign_colours(boxes: Sequence[GroundingBox]) -> list[tuple[int, int, int]]:
    """One colour per box: boxes sharing a phrase share a colour, every distinct phrase (and
    every box without one) gets its own, in order of first appearance."""
    keys: dict[object, int] = {}
    colours = []
    for i, box in enumerate(boxes):
        key = box.phrase if box.phrase is not None else ("unlabelled", i)
        if key not in keys:
            keys[key] = len(keys)
        colours.append(colour_for(keys[key]))
    return colours


def draw_boxes(
    image: Image.Image,
    boxes: Iterable[GroundingBox],
    *,
    font_path: str | Path | None = None,
) -> Image.Image:
    """A copy of `image` (as RGB) with each box outlined and its phrase written on a tag.

    The boxes' coordinates must be pixels of this image (the original the model was asked
    about: filter `parse_grounding`'s result on `image_index` for multi-image requests).
    Boxes are outlined inside their edges (x2/y2 are exclusive edges), quads as polygons,
    points as dots. Labels sit above the box's top-left corner, or inside it when there is
    no room above, and are moved and if need be shortened so they stay inside the picture.
    Line width and font size scale with the image.

    Raises OSError if `font_path` is given and cannot be loaded; without it, a CJK font is
    looked up (see `server.grounding.fonts`).
    """
    boxes = list(boxes)
    out = image.convert("RGB")  # always a copy, also for an RGB input
    width, height = out.size
    line = max(2, round(min(width, height) / 250))
    font = load_font(max(12, round(min(width, height) / 40)), font_path)
    draw = ImageDraw.Draw(out)
    colours = assign_colours(boxes)
    for box, colour in zip(boxes, colours, strict=True):
        _draw_shape(draw, box, colour, line)
    # Labels last, so no outline is drawn over a label.
    for box, colour in zip(boxes, colours, strict=True):
        if box.phrase and box.phrase.strip():
            _draw_label(draw, box, colour, font, (width, height), line)
    return out


def _draw_shape(
    draw: ImageDraw.ImageDraw, box: GroundingBox, colour: tuple[int, int, int], line: int
) -> None:
    if box.kind == "point":
        x, y = box.points[0] if box.points else box.box[:2]
        r = line * 2
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour, outline=(255, 255, 255))
        return
    if box.kind == "quad" and len(box.points) == 4:
        draw.polygon(list(box.points), outline=colour, width=line)
        return
    x1, y1, x2, y2 = box.box
    # x2/y2 are edges; the last pixel inside is one less (but never before x1 for an empty box).
    draw.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=colour, width=line)


def _draw_label(
    draw: ImageDraw.ImageDraw,
    box: GroundingBox,
    colour: tuple[int, int, int],
    font: Font,
    size: tuple[int, int],
    line: int,
) -> None:
    pad = max(1, line // 2 + 1)
    # One line: a phrase's own line breaks would make the tag tall and unmeasurable.
    text = " ".join(box.phrase[:_MAX_LABEL_CHARS].split())
    text = fit_text(draw, text, font, size[0] - 2 * pad)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tag_w, tag_h = right - left + 2 * pad, bottom - top + 2 * pad
    x, y = label_origin(box.box[:2], (tag_w, tag_h), size)
    draw.rectangle((x, y, x + tag_w - 1, y + tag_h - 1), fill=colour)
    draw.text((x + pad - left, y + pad - top), text, font=font, fill=_ink(colour))


def label_origin(
    corner: tuple[int, int], tag_size: tuple[int, int], image_size: tuple[int, int]
) -> tuple[int, int]:
    """Top-left corner for a label tag of `tag_size` belonging to a box whose top-left corner
    is `corner`: just above the box, or just inside its top when there is no room above,
    then shifted so the whole tag lies inside the image (when the tag fits in it at all)."""
    (x1, y1), (tag_w, tag_h), (width, height) = corner, tag_size, image_size
    y = y1 - tag_h if y1 - tag_h >= 0 else y1
    x = min(max(0, x1), max(0, width - tag_w))
    y = min(max(0, y), max(0, height - tag_h))
    return x, y


def fit_text(draw: ImageDraw.ImageDraw, text: str, font: Font, room: int) -> str:
    """`text` if it is at most `room` pixels wide in `font`, else its longest prefix that fits
    with an ellipsis after it (just the ellipsis when nothing fits)."""
    if draw.textlength(text, font=font) <= room:
        return text
    lo, hi = 0, len(text)  # binary search on the kept prefix length
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if draw.textlength(text[:mid] + "…", font=font) <= room:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + "…"


def _ink(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on `colour` (relative luminance)."""
    r, g, b = colour
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)
