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

    def __call__(self, text: str) -> str:
        if self._pattern is None or not text:
            return text
        return self._pattern.sub("", text)
