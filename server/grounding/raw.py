"""What the syntax scanners return: geometry as written, before any coordinate mapping."""

from __future__ import annotations

import math
from dataclasses import dataclass

from server.grounding.types import BoxKind

# How many numbers each kind carries.
ARITY: dict[str, int] = {"box": 4, "point": 2, "quad": 8}


@dataclass(frozen=True, slots=True)
class RawItem:
    """A grounded region as found in the text.

    `offset` is where it starts in the text, so that items found by different scanners can be
    put back in reading order. `coords` holds finite numbers only, `ARITY[kind]` of them.
    """

    offset: int
    kind: BoxKind
    coords: tuple[float, ...]
    phrase: str | None


def clean_phrase(phrase: str | None) -> str | None:
    """Strip whitespace; an empty phrase is no phrase."""
    if phrase is None:
        return None
    phrase = phrase.strip()
    return phrase or None


def finite_numbers(values: list[float] | tuple[float, ...]) -> bool:
    return all(math.isfinite(v) for v in values)
