"""`format_boxes`: the inverse of `parse_grounding`, writing boxes the way a family's model does.

Useful to build few-shot prompts or fine-tuning answers from pixel boxes, and used by the
property tests (format, then parse, gives the boxes back within one grid step).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from server.grounding.coords import model_frame, to_model
from server.grounding.types import Family, GroundingBox

# (phrase, coordinates in original pixels): 4 numbers for a box, 2 for a point, 8 for a quad.
BoxLike = GroundingBox | tuple[str | None, Sequence[float]]

_KIND_BY_ARITY = {4: "box", 2: "point", 8: "quad"}
_TAGS = {
    Family.QWEN_VL: ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>"),
    Family.QWEN2_VL: (
        "<|object_ref_start|>",
        "<|object_ref_end|>",
        "<|box_start|>",
        "<|box_end|>",
        "<|quad_start|>",
        "<|quad_end|>",
    ),
}


def format_boxes(
    boxes: Iterable[BoxLike],
    family: Family | str,
    image_size: tuple[int, int],
    *,
    model_size: tuple[int, int] | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> str:
    """Render boxes given in original pixels of one image in `family`'s answer format.

    - Qwen-VL / Qwen2-VL: tags, e.g. ``<ref>dog</ref><box>(219,424),(576,896)</box>``; a
      run of boxes with the same phrase shares one ref, runs are separated by newlines; a
      point is a box tag holding one pair, a quad a quad tag holding four.
    - Qwen2.5-VL / Qwen3-VL: a ```` ```json ```` fenced list of ``{"bbox_2d": [...],
      "label": ...}`` / ``{"point_2d": [...], ...}`` objects, without ``label`` when the phrase
      is None.

    Coordinates are converted to the family's frame (see `server.grounding.coords`) and
    rounded to integers, as the models write them. Phrases are written verbatim: the tag
    formats have no escaping, so a phrase containing a tag (or, in JSON, a code fence)
    cannot round-trip; nor can one with surrounding whitespace, which parsing strips.

    Raises ValueError for an unknown family, a coordinate tuple that is not 2, 4 or 8 long,
    or a quad for the JSON families (they have no quad format).
    """
    fam = Family(family)
    width, height = image_size
    frame_w, frame_h = model_frame(
        fam, model_size or image_size, min_pixels=min_pixels, max_pixels=max_pixels
    )
    entries = []
    for box in boxes:
        phrase, kind, coords = _unpack(box)
        grid = [
            to_model(v, frame_w, width) if k % 2 == 0 else to_model(v, frame_h, height)
            for k, v in enumerate(coords)
        ]
        entries.append((phrase, kind, grid))
    if fam in _TAGS:
        return _format_tags(entries, _TAGS[fam])
    return _format_json(entries, fam)


def _unpack(box: BoxLike) -> tuple[str | None, str, list[float]]:
    if isinstance(box, GroundingBox):
        if box.kind == "box":
            return box.phrase, "box", list(box.box)
        return box.phrase, box.kind, [v for point in box.points for v in point]
    phrase, coords = box
    kind = _KIND_BY_ARITY.get(len(coords))
    if kind is None:
        raise ValueError("a box needs 4 coordinates, a point 2, a quad 8")
    return phrase, kind, list(coords)


def _pairs(grid: list[int]) -> str:
    return ",".join(f"({grid[k]},{grid[k + 1]})" for k in range(0, len(grid), 2))


def _format_tags(entries: list[tuple[str | None, str, list[int]]], tags: tuple[str, ...]) -> str:
    ref_open, ref_close, box_open, box_close, quad_open, quad_close = tags
    runs: list[str] = []
    previous: object = object()  # a phrase no entry has, so the first entry starts a run
    for phrase, kind, grid in entries:
        if phrase != previous or not runs:
            runs.append(f"{ref_open}{phrase}{ref_close}" if phrase is not None else "")
            previous = phrase
        if kind == "quad":
            runs[-1] += f"{quad_open}{_pairs(grid)}{quad_close}"
        else:
            runs[-1] += f"{box_open}{_pairs(grid)}{box_close}"
    return "\n".join(runs)


def _format_json(entries: list[tuple[str | None, str, list[int]]], family: Family) -> str:
    lines = []
    for phrase, kind, grid in entries:
        if kind == "quad":
            raise ValueError(f"{family} has no quad format")
        obj: dict[str, object] = {"bbox_2d" if kind == "box" else "point_2d": grid}
        if phrase is not None:
            obj["label"] = phrase
        lines.append("    " + json.dumps(obj, ensure_ascii=False))
    return "```json\n[\n" + ",\n".join(lines) + "\n]\n```"
