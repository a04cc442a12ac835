"""Turn OpenAI chat messages into prompt token ids with the model's own chat template.

User-supplied text never becomes control tokens: the template is rendered with a sentinel
in place of each piece of client text, the template's own text is tokenized with special
tokens recognised (`<|im_start|>`, image placeholders, ...), and client text is tokenized
with special-token parsing off. A client writing `<|image_pad|>` or `<img>` therefore
gets those characters as plain text, and cannot desynchronise images and placeholders
(the attack behind vLLM CVE-2026-44222), nor end a turn or open a system one. The
template's plain text next to client text (`user\n` after `<|im_start|>`, the `\n` after an
image) is tokenized together with it, special-token parsing off too (it holds none), so the
ids are those of the whole prompt tokenized at once, as the models were trained on and as
vLLM's own server makes them: tokenized apart, `</img>\n` and a question starting with a
blank line made two newline tokens where the whole prompt has one.

The one exception is the grounding tags (`<ref>`, `<box>`, `<|box_start|>`, ...; see
`server.chat.specials.GROUNDING_TAGS`) that the tokenizer has as single tokens: the models
were trained to read them in both turns (Qwen-VL-Chat's own prompt builder allows them in
user and assistant text), as a referring expression (`<ref>the dog</ref>`), a region
(`<box>(10,20),(30,40)</box>`) or an earlier answer sent back in the history. They open
and close spans of text only, so they cannot move an image or a turn boundary.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.meta
import tokenizers

from server.chat.specials import GROUNDING_TAGS
from server.errors import InvalidRequestError
from server.schemas import ImagePart, Message, RefusalPart, TextPart


@dataclass(frozen=True)
class ImageRef:
    url: str
    param: str  # where it sits in the request, for error messages
    detail: str | None = None  # OpenAI's image_url.detail: "low" caps the picture's size


@dataclass(frozen=True)
class Conversation:
    """Messages in the Hugging Face chat-template shape, plus the images in prompt order."""

    messages: list[dict[str, Any]]
    texts: list[str]  # client text; the messages hold sentinels that point into this list
    images: list[ImageRef]


#: Roles as the chat templates know them ("developer" is OpenAI's newer name for "system",
#: "function" its older one for "tool").
_TEMPLATE_ROLE = {"developer": "system", "function": "tool"}


def collect(messages: list[Message], split_reasoning: bool = False) -> Conversation:
    """Validate roles and content parts and gather images in the order the model sees them.

    A conversation may end with any role: as with OpenAI's API and vLLM's server, the model
    then writes a new assistant turn after it.

    `split_reasoning` (for templates that read a thinking model's reasoning, see
    `PromptRenderer.splits_reasoning`): an assistant turn whose text holds `</think>` is
    handed to the template as `reasoning_content` and the answer after it, split as Qwen3's
    templates split it. Those templates look for `</think>` in the turn's text, which here is
    a sentinel, so they would keep an earlier turn's whole reasoning in the prompt where the
    model's own template drops it."""
    texts: list[str] = []
    images: list[ImageRef] = []
    nonce = secrets.token_hex(4)
    out: list[dict[str, Any]] = []

    def sentinel(text: str) -> str:
        texts.append(text)
        return f"\ue000{nonce}:{len(texts) - 1}\ue001"

    for i, msg in enumerate(messages):
        role = _TEMPLATE_ROLE.get(msg.role, msg.role)
        content = msg.content
        if msg.role != "assistant" and (content is None or content == []):
            # (an assistant turn may be empty: OpenAI's are when they only called tools)
            raise InvalidRequestError(
                f"messages[{i}] ({msg.role}) has no content; send a string or a list of parts.",
                param=f"messages[{i}].content",
            )
        if isinstance(content, list):  # (before the reasoning split, which reads text parts only)
            for j, part in enumerate(content):
                _check_part_role(part, role, msg.role, i, j)
        calls = _calls_as_text(msg) if msg.role == "assistant" else ""
        if split_reasoning and msg.role == "assistant" and (split := _reasoning_split(content, calls)):
            reasoning, answer = split
            out.append({"role": role, "content": [{"type": "text", "text": sentinel(answer)}] if answer else [],
                        # (an empty one stays empty: the template tests it for truth, and a
                        # sentinel is never empty)
                        "reasoning_content": sentinel(reasoning) if reasoning else ""})
            continue
        if content is None or (isinstance(content, str)):
            text = "\n".join(t for t in (content, calls) if t) if calls else (content or "")
            out.append({"role": role, "content": [{"type": "text", "text": sentinel(text)}]})
            continue
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": sentinel(part.text)})
            elif isinstance(part, RefusalPart):
                parts.append({"type": "text", "text": sentinel(part.refusal)})
            else:
                images.append(ImageRef(part.image_url.url, f"messages[{i}].content[{j}].image_url",
                                       part.image_url.detail))
                parts.append({"type": "image"})
        if calls:
            parts.append({"type": "text", "text": sentinel("\n" + calls if parts else calls)})
        out.append({"role": role, "content": parts})
    return Conversation(messages=out, texts=texts, images=images)


def _check_part_role(part: Any, role: str, sent_role: str, i: int, j: int) -> None:
    """Refuse a content part its message's role may not hold: images in user turns only,
    refusals in assistant turns only (text anywhere)."""
    if isinstance(part, TextPart):
        return
    only_in = "assistant" if isinstance(part, RefusalPart) else "user"
    if role != only_in:
        raise InvalidRequestError(
            f"{'A refusal part is' if only_in == 'assistant' else 'Images are'} only accepted in "
            f"{only_in} messages; messages[{i}] has role '{sent_role}'.",
            param=f"messages[{i}].content[{j}]",
        )


def _reasoning_split(content: str | list[Any] | None, calls: str) -> tuple[str, str] | None:
    """(reasoning, answer) of an assistant turn whose content holds `</think>`, else None:
    the text before the last `</think>` from after its `<think>`, and the text after, with
    the newlines around them trimmed as Qwen3's templates trim them; then the turn's tool
    calls (`calls`), which the templates write apart from the content and never split."""
    if isinstance(content, list):
        text = "".join(part.text if isinstance(part, TextPart) else part.refusal for part in content
                       if isinstance(part, (TextPart, RefusalPart)))
    else:
        text = content or ""
    if "</think>" not in text:
        return None
    before, _, after = text.rpartition("</think>")
    reasoning = before.split("</think>")[0].rstrip("\n").split("<think>")[-1].strip("\n")
    answer = after.lstrip("\n")
    return reasoning, "\n".join(t for t in (answer, calls) if t)


def _calls_as_text(msg: Message) -> str:
    """An assistant turn's tool calls as Qwen's templates write them (`<tool_call>` blocks of
    name and arguments), to be tokenized as the turn's plain text: the model then sees which
    call each later tool result answers, whatever its template knows of tools."""
    calls = [(c.function.name, c.function.arguments) if c.function else (c.custom.name, c.custom.input)
             for c in msg.tool_calls or () if c.function or c.custom]
    if msg.function_call:
        calls.append((msg.function_call.name, msg.function_call.arguments))
    blocks = []
    for name, text in calls:
        try:
            arguments = json.dumps(json.loads(text), ensure_ascii=False)
            arguments.encode("utf-8")  # (a "\ud800" escape decodes to a lone surrogate)
        except (ValueError, RecursionError):  # not JSON, nested past the parser's depth, or
            arguments = json.dumps(text, ensure_ascii=False)  # not text: as written
        blocks.append(f'<tool_call>\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {arguments}}}'
                      "\n</tool_call>")
    return "\n".join(blocks)


# Bounds of the renderer's memo of tokenized template pieces (see _encode_template).
_CACHED_PIECE_CHARS = 512
_CACHED_PIECES = 1024
_UNSET = object()


def _private_backend(tokenizer: Any, client_text: bool) -> Any:
    """A copy of a Hugging Face fast tokenizer's Rust tokenizer that reads special tokens in
    text (`client_text=False`) or takes them as plain text (True), with no truncation or
    padding; None for other tokenizers (Qwen-VL's own takes the choice per call and keeps
    no state)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if not isinstance(backend, tokenizers.Tokenizer):
        return None
    copy = tokenizers.Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    copy.encode_special_tokens = client_text
    return copy


#: Template variables the renderer sets or that hold the conversation: never a client's.
_RENDERER_VARIABLES = frozenset({
    "messages", "tools", "documents", "add_generation_prompt", "continue_final_message", "chat_template",
    "tokenize", "bos_token", "eos_token", "pad_token", "unk_token", "raise_exception", "strftime_now",
})


class PromptRenderer:
    """Renders conversations with a tokenizer's chat template into token ids."""

    def __init__(self, tokenizer: Any, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self._sentinel = re.compile("\ue000[0-9a-f]+:(\\d+)\ue001")
        self._template_ids: dict[str, tuple[str, tuple[int, ...], str]] = {}
        self._specials: frozenset[int] | None = None
        self._tags: Any = _UNSET
        self._variables: frozenset[str] | None = None  # the template's own, settable ones
        # A Hugging Face fast tokenizer reads split_special_tokens from a flag on its shared
        # Rust tokenizer, set by each call: a call on another thread (vLLM's, or a render of
        # ours on the prompt thread) could flip it in the middle of ours, and client text then
        # came out with real control tokens (72 of 1,618 encodes in a stress test). So the
        # renderer encodes with private copies whose flags never change: one that reads
        # special tokens (the template's text), one that does not (the client's).
        self._template_backend = _private_backend(tokenizer, client_text=False)
        self._client_backend = _private_backend(tokenizer, client_text=True)

    @property
    def splits_reasoning(self) -> bool:
        """Whether the template reads a thinking model's reasoning out of assistant turns
        (Qwen3-VL Thinking's: it takes `reasoning_content`, else splits the text at
        `</think>`), so that `collect` must split it (see there)."""
        source = self.chat_template or getattr(self.tokenizer, "chat_template", None)
        return isinstance(source, str) and "reasoning_content" in source and "</think>" in source

    def render_text(self, conv: Conversation) -> str:
        """The prompt as text, client text substituted back (for logs and tests)."""
        return self._sentinel.sub(lambda m: conv.texts[int(m.group(1))], self._template(conv))

    def render(self, conv: Conversation, template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """The prompt's token ids. `template_kwargs`: values for the chat template's own
        variables (as `chat_template_kwargs`); names the template does not read, and the
        ones the renderer sets itself, are left out."""
        rendered = self._template(conv, self._template_variables(template_kwargs))
        ids: list[int] = []
        # Plain text waiting to be tokenized as one: client text, and the template's own text
        # beside it up to the nearest special token (module doc).
        run: list[str] = []

        def flush() -> None:
            if run:
                ids.extend(self._encode_plain("".join(run)))
                run.clear()

        def template(part: str) -> None:
            head, special_ids, tail = self._split_template(part)
            run.append(head)
            if special_ids:
                flush()
                ids.extend(special_ids)
                run.append(tail)

        pos = 0
        for m in self._sentinel.finditer(rendered):
            template(rendered[pos : m.start()])
            run.append(conv.texts[int(m.group(1))])
            pos = m.end()
        template(rendered[pos:])
        flush()
        return ids

    def _template_variables(self, given: dict[str, Any] | None) -> dict[str, Any]:
        if not given:
            return {}
        if self._variables is None:
            source = self.chat_template or getattr(self.tokenizer, "chat_template", None)
            try:
                names = jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(source)) \
                    if isinstance(source, str) else set()
            except jinja2.TemplateError:
                names = set()
            self._variables = frozenset(names - _RENDERER_VARIABLES)
        return {k: v for k, v in given.items() if k in self._variables}

    def _template(self, conv: Conversation, variables: dict[str, Any] | None = None) -> str:
        kwargs: dict[str, Any] = {**(variables or {}), "tokenize": False, "add_generation_prompt": True}
        if self.chat_template is not None:
            kwargs["chat_template"] = self.chat_template
        try:
            return self.tokenizer.apply_chat_template(conv.messages, **kwargs)
        except Exception as exc:  # jinja errors raised by the template itself
            raise InvalidRequestError(
                "The messages could not be rendered with this model's chat template "
                "(check the order of roles).",
                param="messages",
            ) from exc

    def _split_template(self, text: str) -> tuple[str, tuple[int, ...], str]:
        """A piece of the template's own text as (head, ids, tail): the plain text before
        its first special token, the ids from that token to its last, and the plain text
        after the last. The head and tail are tokenized with the client text beside them,
        as a tokenizer given the whole prompt would (`</img>\n` then `\n\nDescribe` makes
        one token of the three newlines; tokenized apart, two). A piece without special
        tokens is all head.

        The template's pieces (role headers, image placeholders, the turn's end) are the
        same few strings in every request, and tokenizing is deterministic, so short ones
        are kept. Client text never reaches this method (it is cut out at the sentinels)."""
        split = self._template_ids.get(text)
        if split is None:
            split = self._split(text)
            if len(text) <= _CACHED_PIECE_CHARS:
                if len(self._template_ids) >= _CACHED_PIECES:
                    self._template_ids.clear()
                self._template_ids[text] = split
        return split

    def _split(self, text: str) -> tuple[str, tuple[int, ...], str]:
        if not text:
            return "", (), ""
        ids = self._encode_template(text)
        special = self._special_ids()
        if not special:  # (a tokenizer that does not say which they are: the piece stays whole)
            return "", tuple(ids), ""
        marks = [i for i, token in enumerate(ids) if token in special]
        if not marks:
            return text, (), ""
        head = self._decode(ids[: marks[0]])
        tail = self._decode(ids[marks[-1] + 1 :])
        if not (text.startswith(head) and text.endswith(tail) and len(head) + len(tail) < len(text)):
            return "", tuple(ids), ""  # (text that does not decode back to itself: kept whole)
        return head, tuple(ids[marks[0] : marks[-1] + 1]), tail

    def _special_ids(self) -> frozenset[int]:
        """Ids of the tokens the tokenizer matches whole in template text (its added and
        special tokens: the boundaries that plain text is never tokenized across)."""
        if self._specials is None:
            added = getattr(self.tokenizer, "added_tokens_decoder", None) or {}
            self._specials = frozenset(added) | frozenset(getattr(self.tokenizer, "all_special_ids", ()) or ())
        return self._specials

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _encode_plain(self, text: str) -> list[int]:
        """Client text: special-token parsing off, except the grounding tags (module doc)."""
        tags = self._grounding_tags()
        if not tags or "<" not in text:
            return self._encode_split(text)
        ids: list[int] = []
        pos = 0
        for m in tags[1].finditer(text):
            ids.extend(self._encode_split(text[pos : m.start()]))
            ids.append(tags[0][m.group()])
            pos = m.end()
        ids.extend(self._encode_split(text[pos:]))
        return ids

    def _encode_split(self, text: str) -> list[int]:
        """Text with no special token read in it."""
        if not text:
            return []
        if self._client_backend is not None:
            return self._client_backend.encode(text, add_special_tokens=False).ids
        return list(self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))

    def _encode_template(self, text: str) -> list[int]:
        """Text with its special tokens read as such."""
        if self._template_backend is not None:
            return self._template_backend.encode(text, add_special_tokens=False).ids
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _grounding_tags(self) -> tuple[dict[str, int], re.Pattern[str]] | None:
        """The grounding tags this tokenizer has as single special tokens, and a pattern
        for them; None when it has none. Worked out on first use."""
        if self._tags is _UNSET:
            found: dict[str, int] = {}
            for tag in GROUNDING_TAGS:
                special = self._encode_template(tag)
                if len(special) == 1 and special != self._encode_split(tag):
                    found[tag] = special[0]
            longest_first = sorted(found, key=len, reverse=True)
            self._tags = (found, re.compile("|".join(map(re.escape, longest_first)))) if found else None
        return self._tags
