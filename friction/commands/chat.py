"""`friction chat`: talk to base + adapter, in the ChatML the adapter was trained on, the reply streamed as it comes.

The prompt is the adapter tokenizer's chat template (the training format, saved by train). A turn ends where the
model emits the tokenizer's EOS token, which is what it learned to put after each reply. A tokenizer whose EOS is not
`<|im_end|>` as one token (or that has no EOS) gets the end of turn matched as text as well.
"""

from __future__ import annotations

from pathlib import Path

import click
import torch
from transformers import GenerationConfig, StoppingCriteriaList, StopStringCriteria, TextStreamer

from friction.chatml import IM_END


class TurnStreamer(TextStreamer):
    """Print the reply as it is generated, without the `<|im_end|>` that ends it when that marker is plain text.

    Text that could be the start of the marker is held back until the next piece shows whether it is."""

    def __init__(self, tokenizer, echo: bool = True) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.echo, self.held, self.reply, self.ended = echo, "", "", False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        text = "" if self.ended else self.held + text  # what follows the end of the turn is not the reply
        self.held = ""
        marker = text.find(IM_END)
        if marker != -1:
            text, self.ended = text[:marker], True
        elif not stream_end:
            overlap = next((n for n in range(min(len(IM_END), len(text)), 0, -1) if IM_END.startswith(text[-n:])), 0)
            text, self.held = text[: len(text) - overlap], text[len(text) - overlap :]
        self.reply += text
        if self.echo:
            click.echo(text, nl=stream_end)


def end_of_turn(tokenizer) -> tuple[int | None, StoppingCriteriaList | None]:
    """(EOS id to stop on, text stop criteria): the text match only when EOS is not the single-token `<|im_end|>`."""
    eos = tokenizer.eos_token_id
    im_end_ids = tokenizer.encode(IM_END, add_special_tokens=False)
    if eos is not None and im_end_ids == [eos]:
        return eos, None
    return eos, StoppingCriteriaList([StopStringCriteria(tokenizer, [IM_END])])


def generation_config(folder: Path, tokenizer, max_new_tokens: int, temperature: float, top_p: float):
    """The adapter folder's generation_config.json when it has one, with this session's decoding settings."""
    config = (
        GenerationConfig.from_pretrained(str(folder))
        if (folder / "generation_config.json").is_file()
        else GenerationConfig()
    )
    eos, _ = end_of_turn(tokenizer)
    config.update(
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=top_p if temperature > 0 else None,
        eos_token_id=eos if eos is not None else config.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
    )
    return config


@torch.no_grad()
def reply(model, tokenizer, messages: list[dict[str, str]], config, echo: bool = True) -> str:
    """Generate the assistant's next turn, streaming it; return its text without the end-of-turn marker."""
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    streamer = TurnStreamer(tokenizer, echo=echo)
    _, stop_text = end_of_turn(tokenizer)
    model.generate(
        **inputs.to(model.device),
        generation_config=config,
        streamer=streamer,
        stopping_criteria=stop_text,
        tokenizer=tokenizer if stop_text else None,
    )
    return streamer.reply.strip()


def run(model, tokenizer, folder: Path, prompt: str | None, system: str | None, config) -> None:
    """One reply to `prompt`; without a prompt, a conversation on the terminal until an empty line or end of input."""
    messages = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        reply(model, tokenizer, [*messages, {"role": "user", "content": prompt}], config)
        return
    click.echo(f"chat with {folder} (an empty line or Ctrl-D ends it)", err=True)
    while True:
        try:
            line = click.prompt("you", prompt_suffix="> ", default="", show_default=False)
        except click.Abort:  # Ctrl-D or Ctrl-C
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        click.echo("model> ", nl=False)
        messages.append({"role": "assistant", "content": reply(model, tokenizer, messages, config)})
