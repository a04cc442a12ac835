"""A thinking model's tokenizer for tests: `<think>` tokens and a chat template written here
after the logic of Qwen3-VL Thinking's (the tiny checkpoints have none)."""

from __future__ import annotations

from typing import Any

#: Reads `reasoning_content`, else splits an assistant turn's text at `</think>`; keeps the
#: reasoning only of turns after the last user message (a tool loop in progress); opens the
#: reasoning in the generation prompt.
THINKING_TEMPLATE = (
    "{%- macro text(c) %}{%- if c is string %}{{- c }}{%- else %}{%- for p in c %}"
    "{%- if p.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{%- elif 'text' in p %}{{- p.text }}"
    "{%- endif %}{%- endfor %}{%- endif %}{%- endmacro %}"
    "{%- set ns = namespace(last=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}{%- set content = text(m.content) %}"
    "{%- if m.role == 'assistant' %}{%- set reasoning = '' %}"
    "{%- if m.reasoning_content is string %}{%- set reasoning = m.reasoning_content %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)


def thinking(tokenizer: Any) -> Any:
    """`tokenizer` (a Hugging Face one, changed in place) with the thinking tokens and template."""
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = THINKING_TEMPLATE
    return tokenizer
