"""`QWenTokenizer`: the Qwen-VL tokenizer, read from a checkpoint's `qwen.tiktoken`, no remote code.

It is a transformers slow tokenizer (`PythonBackend`), registered with `AutoTokenizer` under the
class name the checkpoints' `tokenizer_config.json` names, so vLLM (and `AutoTokenizer`) load it
for a Qwen-VL directory with `trust_remote_code` off.

Contract:
- Encoding is tiktoken with the Qwen pre-tokenizer pattern on NFC-normalized text. Special-token
  strings (`<|im_start|>`, `<img>`, ...) become their special ids by default;
  `split_special_tokens=True` encodes them as plain text.
- Ids 0..151642 are the BPE ranks, 151643..151859 the specials of `SPECIAL_TOKENS` (exact ids of
  the published tokenizer); there is no BOS/EOS added on encode.
- Token strings use the GPT-2 byte-to-unicode alphabet, so `convert_ids_to_tokens` /
  `convert_tokens_to_string` behave like any byte-level HF slow tokenizer: an incomplete UTF-8
  sequence decodes to U+FFFD, which vLLM's incremental detokenizer holds back until complete.
- `skip_special_tokens=True` drops the control specials (`<|endoftext|>`, `<|im_*|>`,
  `<|extra_N|>`, `<img>`, `</img>`, `<imgpad>`) but keeps the grounding tags `<ref>`, `</ref>`,
  `<box>`, `</box>`, `<quad>`, `</quad>`: they are part of the model's answer.
- `eos_token` is `<|im_end|>` (the end of a chat turn), `pad_token` is `<|endoftext|>`.
- `chat_template` defaults to the Qwen-VL-Chat template shipped next to this module.
- Unlike the published tokenizer, text between `<img>` and `</img>` is not packed into 256
  byte-valued ids: prompts carry an empty `<img></img>` pair per image, which vLLM's
  multimodal processor (`processing.py`) expands to `<img>` + 256 `<imgpad>` + `</img>`.
"""

from __future__ import annotations

import base64
import os
import unicodedata
from functools import cache
from pathlib import Path
from typing import Any

import tiktoken
from transformers import PythonBackend

VOCAB_FILE_NAME = "qwen.tiktoken"

# The Qwen pre-tokenizer: contractions, letter runs with one optional leading non-letter, single
# digits, punctuation runs with trailing newlines, newline runs, and whitespace.
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
REF_START, REF_END = "<ref>", "</ref>"
BOX_START, BOX_END = "<box>", "</box>"
QUAD_START, QUAD_END = "<quad>", "</quad>"
IMG_START, IMG_END, IMG_PAD = "<img>", "</img>", "<imgpad>"

SPECIAL_START_ID = 151643
# Order defines the ids: <|endoftext|> = 151643 ... <imgpad> = 151859.
SPECIAL_TOKENS: dict[str, int] = {
    token: SPECIAL_START_ID + offset
    for offset, token in enumerate(
        (ENDOFTEXT, IM_START, IM_END, *EXTRAS)
        + (REF_START, REF_END, BOX_START, BOX_END, QUAD_START, QUAD_END)
        + (IMG_START, IMG_END, IMG_PAD)
    )
}
ENDOFTEXT_ID = SPECIAL_TOKENS[ENDOFTEXT]
IM_START_ID = SPECIAL_TOKENS[IM_START]
IM_END_ID = SPECIAL_TOKENS[IM_END]
IMG_START_ID = SPECIAL_TOKENS[IMG_START]
IMG_END_ID = SPECIAL_TOKENS[IMG_END]
IMG_PAD_ID = SPECIAL_TOKENS[IMG_PAD]

GROUNDING_TOKENS = (REF_START, REF_END, BOX_START, BOX_END, QUAD_START, QUAD_END)
# Specials that `skip_special_tokens=True` removes: everything but the grounding tags.
CONTROL_TOKENS = tuple(t for t in SPECIAL_TOKENS if t not in GROUNDING_TOKENS)

# Ids that end a Qwen-VL-Chat turn (the published chat() stops on <|im_end|> and <|im_start|>,
# and the generation config's eos is <|endoftext|>).
CHAT_STOP_TOKEN_IDS = (IM_END_ID, IM_START_ID, ENDOFTEXT_ID)

CHAT_TEMPLATE_PATH = Path(__file__).with_name("chat_template.jinja")


def load_tiktoken_ranks(path: str | os.PathLike[str]) -> dict[bytes, int]:
    """Read a `qwen.tiktoken` file: one `base64(token) rank` per line (LF or CRLF line ends)."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line_no, line in enumerate(f.read().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError as exc:
                raise ValueError(f"{path}:{line_no}: not a 'base64 rank' line") from exc
    return ranks


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (printable ASCII maps to itself)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@cache
def default_chat_template() -> str:
    """The Qwen-VL-Chat template used when a checkpoint ships none (the published ones don't)."""
    return CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")


class QWenTokenizer(PythonBackend):
    """Qwen-VL tokenizer over tiktoken (see the module docstring for the full contract)."""

    vocab_files_names = {"vocab_file": VOCAB_FILE_NAME}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, errors: str = "replace", **kwargs: Any) -> None:
        ranks = load_tiktoken_ranks(vocab_file)
        if len(ranks) != SPECIAL_START_ID:
            raise ValueError(
                f"{vocab_file} has {len(ranks)} BPE ranks; the Qwen-VL vocabulary has "
                f"{SPECIAL_START_ID} (the special-token ids start right after them)"
            )
        self.vocab_file = vocab_file
        self.errors = errors
        self._encoding = tiktoken.Encoding(
            name="qwen_vl",
            pat_str=PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=SPECIAL_TOKENS,
        )
        byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in byte_encoder.items()}
        id_to_token = {rank: "".join(byte_encoder[b] for b in tok) for tok, rank in ranks.items()}
        # Special strings use only printable ASCII, which the byte alphabet maps to itself, so
        # byte-decoding a special token's string yields its text like for any other token.
        id_to_token.update({i: t for t, i in SPECIAL_TOKENS.items()})
        self._id_to_token = id_to_token
        self._token_to_id = {t: i for i, t in id_to_token.items()}
        if len(self._token_to_id) != len(id_to_token):
            raise ValueError(f"{vocab_file}: two ids map to the same token string")
        self._control_ids = frozenset(SPECIAL_TOKENS[t] for t in CONTROL_TOKENS)

        kwargs.setdefault("eos_token", IM_END)
        kwargs.setdefault("pad_token", ENDOFTEXT)
        kwargs.setdefault("extra_special_tokens", list(CONTROL_TOKENS))
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        if not kwargs.get("chat_template"):
            kwargs["chat_template"] = default_chat_template()
        super().__init__(errors=errors, **kwargs)

    # --- vocabulary ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer knows, specials included (151,860 for Qwen-VL)."""
        return self._encoding.n_vocab

    def get_vocab(self) -> dict[str, int]:
        return dict(self._token_to_id)

    def get_added_vocab(self) -> dict[str, int]:
        """Empty: the specials are part of the base vocabulary, not tokens added on top of it.

        (vLLM's slow incremental detokenizer would otherwise join added-token segments with
        spaces, turning `<ref>cat</ref>` into `<ref> cat </ref>`.)
        """
        return {}

    def __len__(self) -> int:
        return self._encoding.n_vocab

    # --- encoding -----------------------------------------------------------------------------

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        """NFC-normalize and BPE-encode `text`; special strings stay specials unless
        `split_special_tokens=True`."""
        split_special_tokens = kwargs.pop("split_special_tokens", self.split_special_tokens)
        return [self._id_to_token[i] for i in self.encode_to_ids(text, split_special_tokens)]

    def encode_to_ids(self, text: str, split_special_tokens: bool = False) -> list[int]:
        """Token ids of `text` straight from tiktoken (the fast path `tokenize` builds on)."""
        text = unicodedata.normalize("NFC", text)
        allowed: set[str] | str = set() if split_special_tokens else "all"
        return self._encoding.encode(text, allowed_special=allowed, disallowed_special=())

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.tokenize(text, split_special_tokens=True)

    def _convert_token_to_id(self, token: str) -> int:
        try:
            return self._token_to_id[token]
        except KeyError:
            raise ValueError(f"{token!r} is not a token of the Qwen-VL vocabulary") from None

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        # Qwen adds no BOS/EOS around a sequence.
        return token_ids_0 + (token_ids_1 or [])

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 0

    # --- decoding -----------------------------------------------------------------------------

    def _convert_id_to_token(self, index: int) -> str:
        # Ids past the tokenizer (the model's 151,936-row padding) have no text.
        return self._id_to_token.get(index, "")

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        data = bytes(self._byte_decoder[c] for c in "".join(tokens))
        return data.decode("utf-8", errors=self.errors)

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        n_vocab = self._encoding.n_vocab
        skip = self._control_ids if skip_special_tokens else frozenset()
        ids = [int(i) for i in token_ids if 0 <= int(i) < n_vocab and int(i) not in skip]
        return self._encoding.decode(ids, errors=self.errors)

    # --- saving -------------------------------------------------------------------------------

    def save_vocabulary(
        self, save_directory: str, filename_prefix: str | None = None
    ) -> tuple[str]:
        """Write the BPE ranks back as a `qwen.tiktoken` file."""
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE_NAME
        path = os.path.join(save_directory, name)
        ranks = self._encoding._mergeable_ranks  # noqa: SLF001 - tiktoken keeps no public getter
        with open(path, "wb") as f:
            for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
                f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
        return (path,)
