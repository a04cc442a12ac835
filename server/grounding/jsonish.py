"""Scanner for JSON answers: ``{"bbox_2d": [x1, y1, x2, y2], "label": "..."}`` and
``{"point_2d": [x, y], "label": "..."}`` (Qwen2.5-VL and Qwen3-VL cookbooks).

Real answers are often not valid JSON, so `json.loads` is not used. The Qwen2.5-VL OCR
cookbook's answer has a comma before every ``}``; answers get cut mid-number when the token
budget runs out; one object may repeat its keys (``"object_name": .., "bbox": .., "object_name":
.., "bbox": ..``, QwenLM/Qwen3-VL#1720); answers come inside a ```` ```json ```` fence or bare
after prose. Instead a small lexer turns the text into strings, numbers and punctuation, and a
stack machine collects, for every ``{...}`` at any depth, its keys in order with their string
or numeric-array values. Missing commas, trailing commas, unclosed objects and single quotes
are tolerated.

What counts:
- geometry keys ``bbox_2d`` / ``bbox`` (4 numbers) and ``point_2d`` / ``point`` (2 numbers);
  nested number lists are flattened, numeric strings accepted, anything else drops the value
  (a word, a character outside JSON such as ``%``, ``/`` or a Unicode minus, ``100-200``);
- the phrase comes from the first present of `LABEL_KEYS`. With several geometries in one
  object, the i-th geometry takes the i-th value of that key;
- an array or string still open at the end of the text is dropped (its last number or word may
  be cut short); the complete parts of an unclosed object are kept.

Where the text has code fences, only fenced blocks are read (prose outside often quotes
numbers); if they hold no geometry, or there are none, the text from its first ``{`` or ``[``
is read. Time is linear: one regex pass whose alternatives all start differently, and a
stack whose frames are each pushed and popped once.
"""

from __future__ import annotations

import re

from server.grounding.raw import ARITY, RawItem, clean_phrase, finite_numbers

GEOMETRY_KEYS = {"bbox_2d": "box", "bbox": "box", "point_2d": "point", "point": "point"}
LABEL_KEYS = (
    "label",
    "text_content",
    "text",
    "name",
    "object_name",
    "category",
    "description",
    "caption",
)

# Strings stop at a line break: JSON forbids raw newlines in strings, and this keeps an
# unbalanced quote in prose from swallowing the rest of the answer. A single-quoted string only
# counts where JSON punctuation follows it, so apostrophes in prose ("it's") are not strings.
# An escaped quote (\') never starts one: a failed attempt reads to the end of its line, so a
# line of N escaped quotes would cost N such reads (quadratic; 100 s for 100 KB).
_TOKEN = re.compile(
    r"""(?P<dq>"(?:[^"\\\n]|\\.)*(?P<dq_end>")?)"""
    r"""|(?P<sq>(?<!\\)'(?:[^'\\\n]|\\.)*'(?=\s*[:,}\]]))"""
    r"""|(?P<num>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)"""
    r"""|(?P<punct>[{}\[\]:,\uff0c\uff1a])"""  # (with full-width commas and colons: answers in Chinese)
    r"""|(?P<word>[A-Za-z_]\w*)"""
    # anything else: a run of characters no token above starts with, or one that started
    # none (a quote, sign or dot alone); inside an array it makes the array unclean
    r"""|(?P<other>[^\s{}\[\]:,\uff0c\uff1a"'0-9A-Za-z_+\-.]+|['+\-.])"""
)
_FULL_WIDTH = {"\uff0c": ",", "\uff1a": ":"}
_SURROGATE = re.compile("[\ud800-\udfff]")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "/": "/"}

_OPEN = object()  # marks a value that did not finish (truncated array or string)


def scan_json(text: str) -> list[RawItem]:
    """Every JSON-style box and point in `text`, in order of appearance."""
    items: list[RawItem] = []
    for start, end in _fenced_blocks(text):
        items.extend(_scan_segment(text, start, end))
    if not items:
        first = _first_bracket(text)
        if first is not None:
            items = _scan_segment(text, first, len(text))
    items.sort(key=lambda item: item.offset)
    return items


def _fenced_blocks(text: str) -> list[tuple[int, int]]:
    """Spans of the contents of ``` fences; an unclosed last fence runs to the end."""
    blocks = []
    pos = 0
    while True:
        opening = text.find("```", pos)
        if opening < 0:
            return blocks
        closing = text.find("```", opening + 3)
        limit = len(text) if closing < 0 else closing
        # (the info string, "json", ends at the line's end; "```json```" on one line is an
        # empty block. Searched only up to the closing fence: fences without line breaks
        # would each search to the end of the text, quadratic in their number.)
        line_end = text.find("\n", opening + 3, limit)
        start = limit if line_end < 0 else line_end + 1
        if closing < 0:
            blocks.append((start, len(text)))
            return blocks
        blocks.append((start, closing))
        pos = closing + 3


def _first_bracket(text: str) -> int | None:
    found = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    return min(found) if found else None


class _Object:
    __slots__ = ("entries", "key", "offset", "state")

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.entries: list[tuple[str, object]] = []
        self.key: str | None = None
        self.state = "key"  # key -> colon -> value -> after (-> key on a comma)

    def put(self, value: object) -> None:
        if self.state == "value" and self.key is not None:
            self.entries.append((self.key, value))
        self.state = "after"


class _Array:
    __slots__ = ("clean", "numbers", "owner", "parent")

    def __init__(self, owner: _Object | None, parent: _Array | None) -> None:
        self.numbers: list[float] = []
        self.clean = True
        self.owner = owner  # the object whose pending key this array is the value of
        self.parent = parent  # the array this one is nested in, to flatten into


def _scan_segment(text: str, start: int, end: int) -> list[RawItem]:
    stack: list[_Object | _Array] = []
    done: list[_Object] = []
    number_end = -1  # where the last number ended
    for match in _TOKEN.finditer(text, start, end):
        top = stack[-1] if stack else None
        kind = match.lastgroup
        if kind == "other":
            if isinstance(top, _Array):
                top.clean = False
        elif kind == "punct":
            _punct(_FULL_WIDTH.get(match.group(), match.group()), match.start(), top, stack, done)
        elif kind in ("dq", "dq_end", "sq"):
            closed = kind == "sq" or match.group("dq_end") is not None
            value = _unquote(match.group()[1:-1] if closed else match.group()[1:])
            _string(value if closed else _OPEN, top)
        elif kind == "num":
            if match.start() == number_end and isinstance(top, _Array):
                top.clean = False  # "100-200": a range or a sum, not two numbers
            _number(float(match.group()), top)
            number_end = match.end()
        else:  # a bare word: true/false/null/NaN, or prose
            if isinstance(top, _Array):
                top.clean = False
            elif isinstance(top, _Object) and top.state == "value":
                top.put(None)
    # End of text: unclosed arrays may have lost their tail; unclosed objects keep what
    # they completed.
    for frame in reversed(stack):
        if isinstance(frame, _Object):
            done.append(frame)
        elif frame.owner is not None:
            frame.owner.put(_OPEN)
    items = []
    for obj in done:
        items.extend(_object_items(obj))
    return items


def _punct(
    char: str,
    offset: int,
    top: _Object | _Array | None,
    stack: list[_Object | _Array],
    done: list[_Object],
) -> None:
    if char == "{":
        if isinstance(top, _Array):
            top.clean = False
        elif isinstance(top, _Object):
            top.put(None)  # an object-valued key: not geometry, not a label
        stack.append(_Object(offset))
    elif char == "[":
        if isinstance(top, _Object) and top.state == "value":
            stack.append(_Array(top, None))
        elif isinstance(top, _Array):
            stack.append(_Array(None, top))
        else:
            stack.append(_Array(None, None))
    elif char == "}":
        while stack:
            frame = stack.pop()
            if isinstance(frame, _Object):
                done.append(frame)
                return
            _close_array(frame)
    elif char == "]":
        while stack:
            frame = stack.pop()
            if isinstance(frame, _Array):
                _close_array(frame)
                return
            done.append(frame)  # an object left open inside the array
    elif isinstance(top, _Object):
        if char == ":" and top.state == "colon":
            top.state = "value"
        elif char == ",":
            top.state = "key"


def _close_array(array: _Array) -> None:
    if array.parent is not None:
        array.parent.numbers.extend(array.numbers)
        array.parent.clean = array.parent.clean and array.clean
    elif array.owner is not None:
        array.owner.put(tuple(array.numbers) if array.clean else None)


def _string(value: object, top: _Object | _Array | None) -> None:
    if isinstance(top, _Array):
        number = _as_number(value)
        if number is None:
            top.clean = False
        else:
            top.numbers.append(number)
    elif isinstance(top, _Object):
        if top.state == "value":
            top.put(value)
        elif isinstance(value, str):
            # A key, also where a comma went missing ("a": "b" "c": ...).
            top.key = value
            top.state = "colon"


def _number(value: float, top: _Object | _Array | None) -> None:
    if isinstance(top, _Array):
        top.numbers.append(value)
    elif isinstance(top, _Object) and top.state == "value":
        top.put(value)


def _as_number(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _unquote(body: str) -> str:
    if "\\" not in body:
        return body
    out = []
    i = 0
    while i < len(body):
        char = body[i]
        if char == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            if nxt == "u" and i + 6 <= len(body):
                try:
                    out.append(chr(int(body[i + 2 : i + 6], 16)))
                    i += 6
                    continue
                except ValueError:
                    pass
            out.append(_ESCAPES.get(nxt, nxt))
            i += 2
        else:
            out.append(char)
            i += 1
    text = "".join(out)
    if not text.isascii() and _SURROGATE.search(text):
        # JSON writes a character beyond U+FFFF as a pair of escapes ("\\ud83d\\ude00"): join
        # the pairs; a lone half is no character (and no UTF-8 encoder takes it): U+FFFD.
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _object_items(obj: _Object) -> list[RawItem]:
    geometries = [(key, value) for key, value in obj.entries if key in GEOMETRY_KEYS]
    if not geometries:
        return []
    label_key = next((k for k in LABEL_KEYS if any(key == k for key, _ in obj.entries)), None)
    labels = [value for key, value in obj.entries if key == label_key]
    items = []
    for index, (key, value) in enumerate(geometries):
        kind = GEOMETRY_KEYS[key]
        if not isinstance(value, tuple) or len(value) != ARITY[kind]:
            continue
        if not finite_numbers(value):
            continue
        label = labels[index] if index < len(labels) else None
        phrase = clean_phrase(label) if isinstance(label, str) else None
        items.append(RawItem(obj.offset, kind, value, phrase))  # type: ignore[arg-type]
    return items
