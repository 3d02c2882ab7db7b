"""The ChatML conversation format the original recipe trained on, and where its trained spans lie in a text.

The base model's own chat template (DeepSeek's) is not what the recipe used: the original formatted plain text with
ChatML markers. friction rows are rendered by `render` (a newline before every ``<|im_end|>``, as the original's
formatting function wrote them); reluctance rows are trained verbatim. Either way the trained spans are found on the
text itself (`assistant_spans`), so masking does not depend on any tokenizer knowing ChatML. The tokenizer makes
``<|im_end|>`` one token, its end-of-sequence id (friction/tokens.py), as the original's did.
"""

from __future__ import annotations

import re

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# The label of a token that is not trained on: what PyTorch's cross-entropy (and so every trainer) ignores.
IGNORE_INDEX = -100

# A turn: its header, its role, and its content up to (not including) the next <|im_end|>.
TURN = re.compile(re.escape(IM_START) + r"(system|user|assistant)\n(.*?)" + re.escape(IM_END), re.DOTALL)

# Jinja twin of `render`, saved with every tokenizer we write so `apply_chat_template` reproduces training text
# (the tokenizer's BOS first, as tokenizing the text added it). The {% generation %} markers make it usable with
# TRL's assistant_only_loss too.
CHAT_TEMPLATE = (
    "{{- bos_token if bos_token else '' }}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '\\n<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '\\n<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def assistant_content(thoughts: str, answer: str) -> str:
    """The assistant turn of the recipe: reasoning inside a think block, then the answer."""
    return f"{THINK_OPEN}\n{thoughts}\n{THINK_CLOSE}\n{answer}"


def render(messages: list[dict[str, str]]) -> str:
    """A conversation in the original's format: every turn's content followed by a newline and ``<|im_end|>``."""
    return "".join(f"{IM_START}{m['role']}\n{m['content']}\n{IM_END}\n" for m in messages)


def turns(text: str) -> list[re.Match[str]]:
    """The ChatML turns of `text`, in order: group 1 the role, group 2 the content (without its ``<|im_end|>``)."""
    return list(TURN.finditer(text))


def assistant_spans(text: str, found: list[re.Match[str]] | None = None) -> list[tuple[int, int]]:
    """The (start, end) character spans trained on: each assistant turn's content through its ``<|im_end|>``, so the
    model learns to end its turn. Text outside turns, and headers, are context only. `found`: turns(text), if known."""
    return [(turn.start(2), turn.end()) for turn in found or turns(text) if turn.group(1) == "assistant"]


def open_assistant_turn(text: str, found: list[re.Match[str]] | None = None) -> tuple[int, int] | None:
    """The span of an assistant turn that `text` ends inside (a head cut from a longer text): from its content's start
    to the end of the text; None when the text does not end inside one."""
    found = turns(text) if found is None else found
    header = f"{IM_START}assistant\n"
    start = text.rfind(header, found[-1].end() if found else 0)
    return (start + len(header), len(text)) if start >= 0 else None


def user_starts(text: str, found: list[re.Match[str]] | None = None) -> list[int]:
    """The character offset of every user turn's header (where the original's masking closed a trained run)."""
    return [turn.start() for turn in found or turns(text) if turn.group(1) == "user"]


def generation_prompt(messages: list[dict[str, str]]) -> str:
    """The text a model continues to answer the conversation's last user turn."""
    return f"{render(messages)}{IM_START}assistant\n"
