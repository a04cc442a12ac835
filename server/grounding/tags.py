"""Scanner for the tag syntax of Qwen-VL and Qwen2-VL.

Qwen-VL:  ``<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>`` and ``<quad>...</quad>``
Qwen2-VL: ``<|object_ref_start|>phrase<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``
          and ``<|quad_start|>...<|quad_end|>``

Both spellings are accepted in any text (a fine-tuned model can mix them); the family only
decides the coordinate frame. Rules, each taken from real output:

- Several boxes may follow one phrase (``<ref> Two apples</ref><box>..</box><box>..</box>``,
  Qwen-VL TUTORIAL.md): the phrase applies to every box that follows it with nothing but
  spaces or commas between. Any other text, or a line break, ends the run, so
  ``<ref>dog</ref><box>..</box> and <box>..</box>`` gives the second box no phrase.
- A box tag holding one pair is a point (Qwen2-VL GUI data: ``<|box_start|>(246,113)<|box_end|>``);
  holding 2n pairs it is n boxes; a closed one holding another odd number is dropped.
- A quad holds four pairs, a closed one a multiple of four or nothing (the pair syntax of ``<quad>`` is not documented anywhere we found;
  the same ``(x,y)`` pairs as boxes are assumed).
- Coordinates written right after a phrase without box tags
  (``<|object_ref_end|>(221,423),(569,886)``, a format seen in Qwen2.5-VL fine-tuning threads)
  count as boxes of that phrase.

Broken output never raises. A closed tag whose content is not a clean list of ``(n,n)`` pairs
is dropped whole, since a stray word could shift which numbers pair up. An unclosed tag (the
stream was cut, or the model forgot the closing tag) keeps the complete pairs before the
first junk; a trailing lone pair is dropped there, as it may be half of a box.

Time is linear in the text: tags are found with one pass of a literal alternation, and the
pair pattern cannot backtrack by more than the length of one number.
"""

from __future__ import annotations

import re

from server.grounding.raw import RawItem, clean_phrase, finite_numbers

_TAG = re.compile(
    r"<(?P<close>/?)(?P<role>ref|box|quad)>"
    r"|<\|(?P<role2>object_ref|box|quad)_(?P<edge>start|end)\|>"
)
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_PAIR = re.compile(rf"\(\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)")
# Separators allowed between pairs, and between boxes sharing a phrase.
_SEPARATORS = " \t,"


class _Tag:
    __slots__ = ("closing", "end", "role", "start")

    def __init__(self, match: re.Match[str]) -> None:
        self.start = match.start()
        self.end = match.end()
        if match.group("role") is not None:
            self.role = match.group("role")
            self.closing = bool(match.group("close"))
        else:
            role = match.group("role2")
            self.role = "ref" if role == "object_ref" else role
            self.closing = match.group("edge") == "end"


def scan_tags(text: str) -> list[RawItem]:
    """Every box, point and quad written in tag syntax, in order of appearance."""
    tags = [_Tag(m) for m in _TAG.finditer(text)]
    items: list[RawItem] = []
    phrase: str | None = None
    cursor = 0  # end of the last element consumed; text after it may break the phrase run
    i = 0
    while i < len(tags):
        tag = tags[i]
        if not _joins(text, cursor, tag.start):
            phrase = None
        if tag.closing:  # a stray closing tag: skip it
            cursor = tag.end
            i += 1
            continue
        nxt = tags[i + 1] if i + 1 < len(tags) else None
        content_end = nxt.start if nxt is not None else len(text)
        closed = nxt is not None and nxt.closing and nxt.role == tag.role
        content = text[tag.end : content_end]
        cursor = nxt.end if closed else content_end
        i += 2 if closed else 1
        if tag.role == "ref":
            phrase = clean_phrase(content)  # an unclosed ref ends at the next tag
            if closed:
                cursor = _bare_boxes(text, cursor, _next_start(tags, i, text), phrase, items)
        else:
            _emit(items, tag.start, tag.role, _pairs(content, closed), closed, phrase)
    return items


def _next_start(tags: list[_Tag], i: int, text: str) -> int:
    return tags[i].start if i < len(tags) else len(text)


def _joins(text: str, start: int, end: int) -> bool:
    """True when text[start:end] keeps a phrase attached: only spaces, tabs and commas."""
    return not text[start:end].strip(_SEPARATORS)


def _pairs(content: str, closed: bool) -> list[tuple[float, float]]:
    """The ``(x,y)`` pairs of a tag's content, under the module's rules for junk."""
    pairs: list[tuple[float, float]] = []
    pos = 0
    clean = True
    for match in _PAIR.finditer(content):
        if content[pos : match.start()].strip(_SEPARATORS + "\r\n"):
            clean = False
            break
        pairs.append((float(match.group(1)), float(match.group(2))))
        pos = match.end()
    if clean and content[pos:].strip(_SEPARATORS + "\r\n"):
        clean = False
    if closed and not clean:
        return []
    return pairs


def _emit(
    items: list[RawItem],
    offset: int,
    role: str,
    pairs: list[tuple[float, float]],
    closed: bool,
    phrase: str | None,
) -> None:
    # A closed tag whose pairs do not make whole boxes (or quads) is not clean either: which
    # pairs belong together is unknown.
    if closed and len(pairs) % (4 if role == "quad" else 2) and not (role == "box" and len(pairs) == 1):
        return
    if role == "quad":
        groups = [pairs[k : k + 4] for k in range(0, len(pairs) - 3, 4)]
        for group in groups:
            _append(items, offset, "quad", [v for p in group for v in p], phrase)
        return
    if closed and len(pairs) == 1:
        _append(items, offset, "point", list(pairs[0]), phrase)
        return
    for k in range(0, len(pairs) - 1, 2):
        _append(items, offset, "box", [*pairs[k], *pairs[k + 1]], phrase)


def _append(
    items: list[RawItem], offset: int, kind: str, coords: list[float], phrase: str | None
) -> None:
    if finite_numbers(coords):  # "1e999"-style overflow cannot be mapped to a pixel
        items.append(RawItem(offset, kind, tuple(coords), phrase))  # type: ignore[arg-type]


def _bare_boxes(text: str, start: int, end: int, phrase: str | None, items: list[RawItem]) -> int:
    """Boxes written as bare pairs right after a phrase; returns where they end."""
    pairs: list[tuple[float, float]] = []
    pos = start
    while True:
        # Only separators may come before each pair (no newline: that ends the phrase).
        probe = pos
        while probe < end and text[probe] in " \t,":
            probe += 1
        match = _PAIR.match(text, probe, end)
        if match is None:
            break
        pairs.append((float(match.group(1)), float(match.group(2))))
        pos = match.end()
    for k in range(0, len(pairs) - 1, 2):
        _append(items, start, "box", [*pairs[k], *pairs[k + 1]], phrase)
    return pos
