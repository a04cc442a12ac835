"""Turn OpenAI chat messages into prompt token ids with the model's own chat template.

User-supplied text never becomes control tokens: the template is rendered with a sentinel
in place of each piece of client text, the template's own text is tokenized with special
tokens recognised (`<|im_start|>`, image placeholders, ...), and client text is tokenized
with special-token parsing off. A client writing `<|image_pad|>` or `<img>` therefore
gets those characters as plain text, and cannot desynchronise images and placeholders
(the attack behind vLLM CVE-2026-44222), nor end a turn or open a system one.

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


def collect(messages: list[Message]) -> Conversation:
    """Validate roles and content parts and gather images in the order the model sees them.

    A conversation may end with any role: as with OpenAI's API and vLLM's server, the model
    then writes a new assistant turn after it."""
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
        calls = _calls_as_text(msg) if msg.role == "assistant" else ""
        if content is None or (isinstance(content, str)):
            text = "\n".join(t for t in (content, calls) if t) if calls else (content or "")
            out.append({"role": role, "content": [{"type": "text", "text": sentinel(text)}]})
            continue
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": sentinel(part.text)})
                continue
            only_in = "assistant" if isinstance(part, RefusalPart) else "user"
            if role != only_in:
                raise InvalidRequestError(
                    f"{'A refusal part is' if only_in == 'assistant' else 'Images are'} only accepted in "
                    f"{only_in} messages; messages[{i}] has role '{msg.role}'.",
                    param=f"messages[{i}].content[{j}]",
                )
            if isinstance(part, RefusalPart):
                parts.append({"type": "text", "text": sentinel(part.refusal)})
            else:
                images.append(ImageRef(part.image_url.url, f"messages[{i}].content[{j}].image_url",
                                       part.image_url.detail))
                parts.append({"type": "image"})
        if calls:
            parts.append({"type": "text", "text": sentinel("\n" + calls if parts else calls)})
        out.append({"role": role, "content": parts})
    return Conversation(messages=out, texts=texts, images=images)


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


class PromptRenderer:
    """Renders conversations with a tokenizer's chat template into token ids."""

    def __init__(self, tokenizer: Any, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self._sentinel = re.compile("\ue000[0-9a-f]+:(\\d+)\ue001")
        self._template_ids: dict[str, tuple[int, ...]] = {}
        self._tags: Any = _UNSET

    def render_text(self, conv: Conversation) -> str:
        """The prompt as text, client text substituted back (for logs and tests)."""
        return self._sentinel.sub(lambda m: conv.texts[int(m.group(1))], self._template(conv))

    def render(self, conv: Conversation) -> list[int]:
        rendered = self._template(conv)
        ids: list[int] = []
        pos = 0
        pending_user: list[str] = []

        def flush_user() -> None:
            if pending_user:
                ids.extend(self._encode_plain("".join(pending_user)))
                pending_user.clear()

        for m in self._sentinel.finditer(rendered):
            template_part = rendered[pos : m.start()]
            if template_part:
                flush_user()
                ids.extend(self._encode_template(template_part))
            # Adjacent pieces of client text are tokenized together, as the model saw them.
            pending_user.append(conv.texts[int(m.group(1))])
            pos = m.end()
        flush_user()
        if pos < len(rendered):
            ids.extend(self._encode_template(rendered[pos:]))
        return ids

    def _template(self, conv: Conversation) -> str:
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": True}
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

    def _encode_template(self, text: str) -> list[int]:
        # The template's own pieces (role headers, image placeholders, the turn's end) are
        # the same few strings in every request; tokenizing is deterministic, so short ones
        # are kept. Client text never reaches this method (it is cut out at the sentinels).
        ids = self._template_ids.get(text)
        if ids is None:
            ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
            if len(text) <= _CACHED_PIECE_CHARS:
                if len(self._template_ids) >= _CACHED_PIECES:
                    self._template_ids.clear()
                self._template_ids[text] = ids
        return list(ids)

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
        if not text:
            return []
        return list(self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))

    def _grounding_tags(self) -> tuple[dict[str, int], re.Pattern[str]] | None:
        """The grounding tags this tokenizer has as single special tokens, and a pattern
        for them; None when it has none. Worked out on first use."""
        if self._tags is _UNSET:
            found: dict[str, int] = {}
            for tag in GROUNDING_TAGS:
                special = list(self.tokenizer.encode(tag, add_special_tokens=False))
                if len(special) == 1 and special != self._encode_split(tag):
                    found[tag] = special[0]
            longest_first = sorted(found, key=len, reverse=True)
            self._tags = (found, re.compile("|".join(map(re.escape, longest_first)))) if found else None
        return self._tags
