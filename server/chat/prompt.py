"""Turn OpenAI chat messages into prompt token ids with the model's own chat template.

User-supplied text never becomes special tokens: the template is rendered with a sentinel
in place of each piece of client text, the template's own text is tokenized with special
tokens recognised (`<|im_start|>`, image placeholders, ...), and client text is tokenized
with special-token parsing off. A client writing `<|image_pad|>` or `<img>` therefore
gets those characters as plain text, and cannot desynchronise images and placeholders
(the attack behind vLLM CVE-2026-44222).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

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
        if content is None or (isinstance(content, str)):
            out.append({"role": role, "content": [{"type": "text", "text": sentinel(content or "")}]})
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
        out.append({"role": role, "content": parts})
    return Conversation(messages=out, texts=texts, images=images)


class PromptRenderer:
    """Renders conversations with a tokenizer's chat template into token ids."""

    def __init__(self, tokenizer: Any, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self._sentinel = re.compile("\ue000[0-9a-f]+:(\\d+)\ue001")

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
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _encode_plain(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))
