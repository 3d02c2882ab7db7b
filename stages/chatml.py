"""The ChatML conversation format the original recipe trained on, rendered the same way for every tokenizer.

The base model's own chat template (DeepSeek's) is not what the recipe used: the original formatted plain text with
ChatML markers, a newline before every ``<|im_end|>``. We render that text ourselves and locate the assistant turns by
character offsets, so masking does not depend on any tokenizer knowing ChatML.
"""

from __future__ import annotations

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# The label of a token that is not trained on: what PyTorch's cross-entropy (and so every trainer) ignores.
IGNORE_INDEX = -100

# Jinja twin of `render`, saved with every tokenizer we write so `apply_chat_template` reproduces training text.
# The {% generation %} markers make it usable with TRL's assistant_only_loss too.
CHAT_TEMPLATE = (
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


def _turn(message: dict[str, str]) -> tuple[str, str]:
    """A turn's header and body; `render` puts a newline after the body."""
    return f"{IM_START}{message['role']}\n", f"{message['content']}\n{IM_END}"


def render(messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return the text and the (start, end) character spans that are trained on.

    A trained span is an assistant turn's content plus its closing ``<|im_end|>``, so the model learns to stop.
    """
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    for message, start in zip(messages, turn_starts(messages)):
        header, body = _turn(message)
        parts += [header, body, "\n"]
        if message["role"] == "assistant":
            spans.append((start + len(header), start + len(header) + len(body)))
    return "".join(parts), spans


def turn_starts(messages: list[dict[str, str]]) -> list[int]:
    """The character offset in `render`'s text where each message's turn (its ``<|im_start|>`` header) begins."""
    starts: list[int] = []
    cursor = 0
    for message in messages:
        starts.append(cursor)
        header, body = _turn(message)
        cursor += len(header) + len(body) + 1
    return starts


def generation_prompt(messages: list[dict[str, str]]) -> str:
    """The text a model continues to answer the conversation's last user turn."""
    text, _ = render(messages)
    return f"{text}{IM_START}assistant\n"
