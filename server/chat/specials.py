"""Which special tokens reach `content`.

Grounding answers are written with special tokens (`<|box_start|>` in Qwen2-VL,
`<box>` in Qwen-VL); stripping every special token, as detokenizers do by default, would
delete the answer. So for Hugging Face tokenizers the engine decodes with special tokens
kept and this filter removes all of them except the grounding tags. (The Qwen-VL tokenizer
of our plugin already keeps exactly the grounding tags when told to skip specials.)
"""

from __future__ import annotations

import re
from typing import Any

GROUNDING_TAGS = frozenset({
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>",
    "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>",
})


class SpecialTokenFilter:
    """Removes special-token strings other than grounding tags from generated text.

    `active` is False when the tokenizer does not list its special tokens; then the
    engine's own `skip_special_tokens` handling is used unchanged.
    """

    def __init__(self, tokenizer: Any) -> None:
        specials: set[str] = set()
        decoder = getattr(tokenizer, "added_tokens_decoder", None)
        if isinstance(decoder, dict):
            specials |= {tok.content for tok in decoder.values() if getattr(tok, "special", False)}
        specials |= set(getattr(tokenizer, "all_special_tokens", []) or [])
        drop = sorted(specials - GROUNDING_TAGS, key=len, reverse=True)
        keeps_grounding = bool(specials & GROUNDING_TAGS)
        # Only worth it when the tokenizer marks grounding tags as special (Qwen2-VL family).
        self.active = bool(drop) and keeps_grounding
        self._pattern = re.compile("|".join(map(re.escape, drop))) if drop else None
        self._prefixes = frozenset(tok[:i] for tok in drop for i in range(1, len(tok)))
        self._longest = max(map(len, drop), default=0)

    def __call__(self, text: str) -> str:
        if self._pattern is None or not text:
            return text
        return self._pattern.sub("", text)

    def pieces(self) -> "PieceFilter":
        """A filter for one text that arrives in pieces (a stream's deltas)."""
        return PieceFilter(self)

    def held_back(self, text: str) -> int:
        """How many characters at the end of `text` could begin a special token."""
        for k in range(min(len(text), self._longest - 1), 0, -1):
            if text[-k:] in self._prefixes:
                return k
        return 0


class PieceFilter:
    """`SpecialTokenFilter` across the pieces of one text.

    A special token can be split between two deltas: when the request has stop strings,
    the engine holds back the text that might begin one, whatever that text is. So the end
    of a piece that could begin a special token waits for the next piece (or `flush`).
    """

    def __init__(self, specials: SpecialTokenFilter) -> None:
        self._specials = specials
        self._held = ""

    def feed(self, piece: str) -> str:
        """The text of `piece` that is known to be final, specials removed."""
        text = self._specials(self._held + piece)
        k = self._specials.held_back(text)
        self._held = text[len(text) - k:] if k else ""
        return text[: len(text) - k]

    def flush(self) -> str:
        """What was held back, at the end of the text (an unfinished special token is text)."""
        held, self._held = self._held, ""
        return held
