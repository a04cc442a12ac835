"""Scanners for Qwen2.5-VL's two other documented answer styles (spatial_understanding
cookbook, section "spatial understanding with designed system prompt"):

- points as XML: ``<points x1="284" y1="305" alt="person">person</points>``, possibly several
  points (``x2``/``y2`` ...) in one element, blanks tolerated inside the tag;
- boxes as plain text, one per line: ``43,378,996,957 cakes``.

The plain-text style is only a fallback (see `server.grounding.parse`), and is strict: every
line of the answer is four integers without leading zeros, then a phrase, so that
"1,000,000,000 dollars" or a line of numbers inside prose stays prose.
"""

from __future__ import annotations

import re

from server.grounding.raw import RawItem, clean_phrase, finite_numbers

# `[^<>]*` and `[^<]*` cannot backtrack into each other, so a failed match costs at most the
# distance to the next angle bracket.
_POINTS = re.compile(r"<\s*points\b(?P<attrs>[^<>]*)>(?P<body>[^<]*)")
# The look-behind and possessive quantifiers keep a failed match from being retried at every
# letter of a long word, which would be quadratic.
_ATTR = re.compile(
    r"""(?<![\w-])(?P<name>[A-Za-z_][\w-]*+)\s*+=\s*+(?:"(?P<dq>[^"]*)"|'(?P<sq>[^']*)')"""
)
_COORD_NAME = re.compile(r"([xy])(\d*)")
_INT = r"(?:0|[1-9]\d{0,5})"
_PLAIN_LINE = re.compile(
    rf"[ \t]*({_INT})[ \t]*,[ \t]*({_INT})[ \t]*,[ \t]*({_INT})[ \t]*,[ \t]*({_INT})"
    r"[ \t]+(\S[^\n]*)"  # trailing blanks are stripped after matching, not by the regex
)


def scan_xml_points(text: str) -> list[RawItem]:
    """Every point of every ``<points ...>`` element, in order."""
    items: list[RawItem] = []
    for element in _POINTS.finditer(text):
        coords: dict[str, dict[str, float]] = {}
        alt = None
        for attr in _ATTR.finditer(element.group("attrs")):
            value = attr.group("dq") if attr.group("dq") is not None else attr.group("sq")
            name = attr.group("name")
            if name == "alt":
                alt = value
                continue
            coord = _COORD_NAME.fullmatch(name)
            number = _number(value)
            if coord is not None and number is not None:
                coords.setdefault(coord.group(2), {})[coord.group(1)] = number
        phrase = clean_phrase(element.group("body")) or clean_phrase(alt)
        # (by length, then text: the numeric order, without int() on thousands of digits)
        for suffix in sorted(coords, key=lambda s: (len(s.lstrip("0")), s.lstrip("0"))):
            point = coords[suffix]
            if "x" in point and "y" in point and finite_numbers((point["x"], point["y"])):
                items.append(RawItem(element.start(), "point", (point["x"], point["y"]), phrase))
    return items


def scan_plain_lines(text: str) -> list[RawItem]:
    """Every line of `text` as ``x1,y1,x2,y2 phrase``, if each of its non-blank lines is
    one; else nothing (an answer with prose around such a line is prose)."""
    items = []
    offset = 0
    for line in text.split("\n"):
        line_text = line.rstrip("\r")
        match = _PLAIN_LINE.fullmatch(line_text)
        if match is not None:
            coords = tuple(float(match.group(k)) for k in range(1, 5))
            items.append(RawItem(offset, "box", coords, clean_phrase(match.group(5))))
        elif line_text.strip():
            return []
        offset += len(line) + 1
    return items


def _number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None
