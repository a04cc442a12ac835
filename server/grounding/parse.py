"""`parse_grounding`: model text in, boxes in original-image pixels out."""

from __future__ import annotations

from collections.abc import Sequence

from server.grounding.coords import model_frame, to_pixel
from server.grounding.jsonish import scan_json
from server.grounding.raw import RawItem
from server.grounding.tags import scan_tags
from server.grounding.textual import scan_plain_lines, scan_xml_points
from server.grounding.types import Family, GroundingBox

Size = tuple[int, int]


def parse_grounding(
    text: str,
    family: Family | str,
    image_sizes: Sequence[Size],
    *,
    model_sizes: Sequence[Size] | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    image_index: int | None = None,
) -> list[GroundingBox]:
    """Find every grounded box, quad and point in a model answer and map it to original pixels.

    Args:
        text: the answer as the model wrote it, special-token strings included. For Qwen-VL
            and Qwen2-VL the tags (``<ref>``, ``<|box_start|>`` ...) are special tokens: text
            decoded with ``skip_special_tokens=True`` has lost them and yields nothing.
        family: which generation wrote it; decides the coordinate frame, not the syntax.
            Every syntax (tags of either generation, JSON ``bbox_2d``/``point_2d``, XML
            ``<points>``, and plain ``x1,y1,x2,y2 label`` lines when nothing else is found
            and the whole answer is such lines, see `extract`) is read for every family,
            since fine-tuned models mix them.
        image_sizes: ``(width, height)`` of the request's images as received, in order.
        model_sizes: ``(width, height)`` of each image as handed to the model's processor,
            when the server downscaled it first; defaults to `image_sizes`. Only Qwen2.5-VL
            needs it (its coordinates are pixels of ``smart_resize(model size)``).
        min_pixels, max_pixels: the processor's bounds for Qwen2.5-VL's `smart_resize`;
            default to the checkpoints' 3136 and 12845056. Ignored by the other families.
        image_index: which image the boxes refer to. Default: the last image, because the
            models ground on the most recent picture (Qwen-VL's own
            ``draw_bbox_on_latest_picture`` does the same). Negative values count from the end.

    Returns:
        The boxes in reading order. Empty when the request had no image (coordinates on a
        grid have no meaning without the image they describe) or nothing could be parsed.

    Never raises because of `text`: broken output (unclosed tags, non-numbers, swapped
    corners, values out of range, truncation) gives whatever can be recovered. Raises
    ValueError for invalid arguments: an unknown family, a non-positive image size,
    `model_sizes` of another length than `image_sizes`, an `image_index` out of range.
    """
    fam = Family(family)
    sizes = _checked_sizes(image_sizes, "image_sizes")
    models = sizes if model_sizes is None else _checked_sizes(model_sizes, "model_sizes")
    if len(models) != len(sizes):
        raise ValueError("model_sizes must have one entry per image")
    if not sizes:
        return []
    index = _resolve_index(image_index, len(sizes))
    if not isinstance(text, str) or not text:
        return []
    frame_w, frame_h = model_frame(fam, models[index], min_pixels=min_pixels, max_pixels=max_pixels)
    width, height = sizes[index]

    def px(x: float, y: float) -> tuple[int, int]:
        return to_pixel(x, frame_w, width), to_pixel(y, frame_h, height)

    return [_to_box(item, index, px) for item in extract(_answer_part(text), (frame_w, frame_h))]


def _answer_part(text: str) -> str:
    """`text` without a thinking model's reasoning: its drafts are not the answer. Qwen3-VL
    Thinking's template opens the `<think>` block in the prompt, so the output may hold only
    its end. An answer that begins with `<think>` and was cut off inside it has no answer
    yet; a `<think>` elsewhere, unclosed, is text the answer mentions, as any other."""
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    if text.lstrip().startswith("<think>"):
        return ""
    return text


def extract(text: str, frame: tuple[float, float] | None = None) -> list[RawItem]:
    """Every grounded item in `text` in any supported syntax, in reading order, unmapped.

    Plain ``x1,y1,x2,y2 label`` lines are only a fallback, and only when the whole answer is
    such lines, each box with its corners in order and, given the model's coordinate
    `frame` (width, height), inside it: a line of four numbers and words is an ordinary
    answer too ("7,10,23,45 are the numbers on the jerseys", a score, a population)."""
    items = scan_tags(text) + scan_json(text) + scan_xml_points(text)
    if not items:
        items = scan_plain_lines(text)
        if not all(_plain_box_fits(item.coords, frame) for item in items):
            items = []
    items.sort(key=lambda item: item.offset)  # stable: items from one place keep their order
    return items


def _plain_box_fits(coords: tuple[float, ...], frame: tuple[float, float] | None) -> bool:
    x1, y1, x2, y2 = coords
    if not (x1 < x2 and y1 < y2):
        return False
    return frame is None or (x2 <= frame[0] and y2 <= frame[1])


def _to_box(item: RawItem, index: int, px) -> GroundingBox:
    c = item.coords
    points = [px(c[k], c[k + 1]) for k in range(0, len(c), 2)]
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    return GroundingBox(
        phrase=item.phrase,
        box=(min(xs), min(ys), max(xs), max(ys)),
        model_box=c,
        image_index=index,
        kind=item.kind,
        points=() if item.kind == "box" else tuple(points),
    )


def _checked_sizes(sizes: Sequence[Size], name: str) -> list[Size]:
    checked = []
    for size in sizes:
        width, height = size
        if int(width) != width or int(height) != height or width <= 0 or height <= 0:
            raise ValueError(f"{name} must hold positive integer (width, height) pairs")
        checked.append((int(width), int(height)))
    return checked


def _resolve_index(image_index: int | None, count: int) -> int:
    if image_index is None:
        return count - 1
    if not -count <= image_index < count:
        raise ValueError(f"image_index {image_index} is out of range for {count} image(s)")
    return image_index % count
