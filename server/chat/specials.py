"""Which special tokens reach `content`.

Grounding answers are written with special tokens (`<|box_start|>` in Qwen2-VL,
`<box>` in Qwen-VL); stripping every special token, as detokenizers do by default, would
delete the answer. `keep_grounding_tags_when_skipping` marks the grounding tags of a fast
(Hugging Face `tokenizers`) tokenizer as ordinary added tokens, so that the engine's
detokenizer, told to skip special tokens, keeps exactly them; the Qwen-VL tokenizer of our
plugin already does so. Only where neither holds does the engine decode with every special
token kept and `SpecialTokenFilter` remove the others afterwards: then stop strings are
matched by the engine against text with special tokens in it.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

log = logging.getLogger(__name__)

GROUNDING_TAGS = frozenset({
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>",
    "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>",
})


def keep_grounding_tags_when_skipping(tokenizer: Any) -> bool:
    """Mark the grounding tags of `tokenizer`'s `tokenizers` backend as ordinary added
    tokens, in place, so that decoding with `skip_special_tokens` keeps them and drops the
    other special tokens. Encoding is unchanged: an added token is matched whole either way.

    Call before the tokenizer decodes anything (vLLM's detokenizer reads the backend when a
    request starts). Returns whether any tag was changed; False for a tokenizer without
    such a backend, or whose grounding tags are not special."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not callable(getattr(backend, "to_str", None)):
        return False
    try:
        from tokenizers import Tokenizer

        spec = json.loads(backend.to_str())
        changed = 0
        for token in spec.get("added_tokens") or []:
            if token.get("content") in GROUNDING_TAGS and token.get("special"):
                token["special"] = False
                changed += 1
        if not changed:
            return False
        tokenizer._tokenizer = Tokenizer.from_str(json.dumps(spec))
    except Exception:  # noqa: BLE001 - an unusual backend: fall back to SpecialTokenFilter
        log.warning("could not mark the grounding tags as ordinary tokens; filtering specials instead",
                    exc_info=True)
        return False
    return True


class SpecialTokenFilter:
    """Removes special-token strings other than grounding tags from generated text.

    `active` is True only when the tokenizer, told to skip special tokens, would drop the
    grounding tags too; otherwise the engine's own `skip_special_tokens` handling is used
    unchanged.
    """

    def __init__(self, tokenizer: Any) -> None:
        specials: set[str] = set()
        decoder = getattr(tokenizer, "added_tokens_decoder", None)
        if isinstance(decoder, dict):
            specials |= {tok.content for tok in decoder.values() if getattr(tok, "special", False)}
        specials |= set(getattr(tokenizer, "all_special_tokens", []) or [])
        drop = sorted(specials - GROUNDING_TAGS, key=len, reverse=True)
        self.active = bool(drop) and _skipping_drops_grounding(tokenizer, specials & GROUNDING_TAGS)
        self._pattern = re.compile("|".join(map(re.escape, drop))) if drop else None
        self._prefixes = frozenset(tok[:i] for tok in drop for i in range(1, len(tok)))
        self._longest = max(map(len, drop), default=0)

    def __call__(self, text: str) -> str:
        if self._pattern is None or not text:
            return text
        return self._pattern.sub("", text)

    def split(self, text: str) -> tuple[str, str]:
        """`text` with special tokens removed, as (the kept text before the end of the last
        one, the raw rest after it)."""
        if self._pattern is None:
            return "", text
        kept, pos = [], 0
        for match in self._pattern.finditer(text):
            kept.append(text[pos:match.start()])
            pos = match.end()
        return "".join(kept), text[pos:]

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

    The pieces joined give what the filter gives for the whole text. What is held back is
    raw text from after the last special token removed: text on both sides of a removed
    token never joins into another one (`<|im_` `<|vision_start|>` `end|>` is the text
    `<|im_end|>`, in a stream as in the whole answer).
    """

    def __init__(self, specials: SpecialTokenFilter) -> None:
        self._specials = specials
        self._held = ""

    def feed(self, piece: str) -> str:
        """The text of `piece` that is known to be final, specials removed."""
        kept, rest = self._specials.split(self._held + piece)
        k = self._specials.held_back(rest)
        self._held = rest[len(rest) - k:] if k else ""
        return kept + rest[: len(rest) - k]

    def flush(self) -> str:
        """What was held back, at the end of the text (an unfinished special token is text)."""
        held, self._held = self._held, ""
        return held


def _skipping_drops_grounding(tokenizer: Any, tags: set[str]) -> bool:
    """Whether decoding with `skip_special_tokens` loses any of `tags`, decoded as vLLM's
    detokenizer decodes: by the `tokenizers` backend where there is one (Transformers'
    own `decode` also drops every token its special-token lists name), else by `decode`."""
    backend = getattr(tokenizer, "_tokenizer", None)
    decode = backend.decode if callable(getattr(backend, "decode", None)) else tokenizer.decode
    for tag in tags:
        try:
            ids = tokenizer.convert_tokens_to_ids([tag])
            if ids and ids[0] is not None and tag not in decode(ids, skip_special_tokens=True):
                return True
        except Exception:  # noqa: BLE001 - cannot tell: filter, as before
            return True
    return False
