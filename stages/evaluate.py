"""evaluate: the base model against base + adapter, on the same validation rows and the same held-out prompts.

Validation loss is the token-weighted mean over exactly the labels the trainer used (packed rows, per-example
positions, cache off so packed examples cannot see each other). Generation uses the project's own held-out
prompts, in left-padded batches with the decoding settings of `evaluate` in params.yaml, and stops each response at
<|im_end|>, the tokenizer's EOS id as in training (`stop_settings`); both responses are scored with the friction
metrics and saved side by side.
The adapter is loaded with transformers + peft whichever backend trained it: it is a plain PEFT adapter either way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import click
import torch
from datasets import Dataset
from peft import PeftModel
from tqdm import tqdm
from safetensors import SafetensorError, safe_open
from transformers import StoppingCriteriaList, StopStringCriteria, set_seed

from friction import friction_metrics
from friction.artifacts import write_json
from friction.schemas import PACKED_SCHEMA, read_parquet
from friction.chatml import IGNORE_INDEX, IM_END, generation_prompt
from friction.config import Params, load_params
from friction.modeling import load_base_model
from friction.tokens import end_of_turn_id
from friction import environment
from friction.pipeline import path_option


def position_ids(seq_lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(length) for length in seq_lengths])


@torch.no_grad()
def validation_loss(model, rows: Dataset, device: torch.device, label: str) -> tuple[float, int]:
    """Mean cross-entropy per trained token, and the number of trained tokens."""
    total, count = 0.0, 0
    for row in tqdm(rows, desc=f"evaluate: validation loss, {label}", unit="row"):
        input_ids = torch.tensor([row["input_ids"]], device=device)
        positions = position_ids(row["seq_lengths"]).unsqueeze(0).to(device)
        labels = torch.tensor([row["labels"]], device=device)
        labels[positions == 0] = IGNORE_INDEX  # the first token of an example is never predicted from the previous one
        logits = model(input_ids=input_ids, position_ids=positions, use_cache=False).logits.float()
        targets = labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total += losses.item()
        count += int((targets != IGNORE_INDEX).sum())
    return total / max(count, 1), count


def stop_settings(tokenizer) -> dict:
    """generate()'s arguments that end a response at the end of its turn, <|im_end|>.

    The tokenizer maps <|im_end|> to its EOS id (friction/tokens.py), which the model was trained to emit: stop on that
    id. A tokenizer with no EOS leaves <|im_end|> as plain text, split into BPE pieces: then match the text, which
    stops at its last piece.
    """
    stop_id = end_of_turn_id(tokenizer)
    if stop_id is not None:
        return {"eos_token_id": stop_id}
    return {"stopping_criteria": turn_end_criteria(tokenizer)}


def turn_end_criteria(tokenizer) -> StoppingCriteriaList:
    """Stop as soon as a response's text ends in <|im_end|>, however many BPE pieces spell it."""
    return StoppingCriteriaList([StopStringCriteria(tokenizer, [IM_END])])


def decoding(params: Params) -> dict[str, bool | float]:
    settings = params.evaluate
    if settings.temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}


def response_text(tokenizer, ids: torch.Tensor) -> str:
    """A generated turn as text, cut at its end (a row of a batch that finished early goes on with padding)."""
    text = tokenizer.decode(ids, skip_special_tokens=False)
    for end_marker in (IM_END, tokenizer.eos_token, tokenizer.pad_token):
        if end_marker:
            text = text.split(end_marker)[0]
    return text.strip()


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], params: Params, device: torch.device, label: str) -> list[str]:
    """Responses to `prompts` in batches of evaluate.batch_size; the tokenizer must pad on the left."""
    settings = params.evaluate
    set_seed(params.seed)  # both models sample from the same random stream
    stop = stop_settings(tokenizer)
    responses = []
    batches = range(0, len(prompts), settings.batch_size)
    for start in tqdm(batches, desc=f"evaluate: generating, {label}", unit="batch"):
        # The tokenizer's own special tokens (its BOS) as in the training data.
        batch = tokenizer(prompts[start : start + settings.batch_size], return_tensors="pt", padding=True).to(device)
        output = model.generate(
            **batch,
            max_new_tokens=settings.max_new_tokens,
            **stop,
            pad_token_id=tokenizer.pad_token_id,
            **decoding(params),
        )
        responses += [response_text(tokenizer, ids) for ids in output[:, batch["input_ids"].shape[1] :]]
    return responses


def read_prompts(path: Path, limit: int | None) -> list[dict]:
    if not path.is_file():
        raise click.ClickException(f"{path}: missing; held-out prompts, one JSON object with a 'prompt' a line")
    prompts = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
                    raise ValueError("needs a non-empty string 'prompt'")
            except (json.JSONDecodeError, ValueError, AttributeError) as error:
                raise click.ClickException(f"{path} line {line_number}: {error}") from None
            prompts.append(record)
    if not prompts:
        raise click.ClickException(f"{path}: no prompts")
    return prompts[:limit]


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def check_adapter(adapter_dir: Path) -> None:
    """The adapter train wrote, whole; otherwise say so here (peft would go looking for it on the Hub)."""
    missing = [name for name in ADAPTER_FILES if not (adapter_dir / name).is_file()]
    if missing:
        raise click.ClickException(f"{adapter_dir / missing[0]}: missing; run train (dvc repro train)")
    try:
        json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
        with safe_open(adapter_dir / "adapter_model.safetensors", framework="pt") as weights:
            weights.keys()
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as error:
        raise click.ClickException(f"{adapter_dir}: a damaged adapter ({error}); rerun train") from None


def validation_rows(path: Path) -> Dataset:
    missing = [name for name in PACKED_SCHEMA.names if name not in read_parquet(path, rerun="pack").schema.names]
    if missing:
        raise click.ClickException(f"{path}: no column {missing[0]!r}; rerun pack")
    return Dataset.from_parquet(str(path))


def load_models(params: Params, manifest_path: Path, adapter_dir: Path):
    """The base with the adapter (switched off for the base's turn), its tokenizer set up to generate, the device."""
    base, tokenizer, _, _ = load_base_model(params, manifest_path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    if not params.model.load_in_4bit:  # a 4-bit model is on the GPU already and cannot be moved
        model.to(device)
    tokenizer.padding_side = "left"  # generation continues every prompt from its last token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, device


def scored(prompts: list[dict], base_responses: list[str], adapter_responses: list[str]) -> list[dict]:
    return [
        {
            "id": prompt.get("id"),
            "prompt": prompt["prompt"],
            "base_response": base_response,
            "adapter_response": adapter_response,
            "base_metrics": friction_metrics.score(base_response),
            "adapter_metrics": friction_metrics.score(adapter_response),
        }
        for prompt, base_response, adapter_response in zip(prompts, base_responses, adapter_responses, strict=True)
    ]


def report(losses: dict[str, float], tokens: int, samples: list[dict]) -> dict:
    return {
        "validation": {
            "tokens": tokens,
            **{f"{label}_loss": round(loss, 4) for label, loss in losses.items()},
            **{f"{label}_perplexity": round(math.exp(loss), 3) for label, loss in losses.items()},
        },
        "friction": {
            "prompts": len(samples),
            "base": friction_metrics.summarize([s["base_metrics"] for s in samples]),
            "adapter": friction_metrics.summarize([s["adapter_metrics"] for s in samples]),
        },
    }


def run(
    params: Params, packed_dir: Path, manifest_path: Path, adapter_dir: Path, prompts_path: Path,
    samples_path: Path, metrics_path: Path,
) -> None:  # fmt: skip
    prompts = read_prompts(prompts_path, params.evaluate.max_prompts)
    check_adapter(adapter_dir)  # everything that can fail on a user's file fails before the base model loads
    rows = validation_rows(packed_dir / "validation.parquet")
    model, tokenizer, device = load_models(params, manifest_path, adapter_dir)

    with model.disable_adapter():
        base_loss, tokens = validation_loss(model, rows, device, "base")
    adapter_loss, _ = validation_loss(model, rows, device, "base + adapter")
    click.echo(f"evaluate: validation loss base {base_loss:.4f} -> adapter {adapter_loss:.4f} ({tokens} tokens)")

    system = {"role": "system", "content": params.mix.system_prompt}
    texts = [generation_prompt([system, {"role": "user", "content": p["prompt"]}]) for p in prompts]
    with model.disable_adapter():
        base_responses = generate(model, tokenizer, texts, params, device, "base")
    adapter_responses = generate(model, tokenizer, texts, params, device, "base + adapter")

    samples = scored(prompts, base_responses, adapter_responses)
    samples_path.parent.mkdir(parents=True, exist_ok=True)
    with samples_path.open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(sample, ensure_ascii=False) + "\n" for sample in samples)
    write_json(metrics_path, report({"base": base_loss, "adapter": adapter_loss}, tokens, samples))
    click.echo(f"evaluate: {len(samples)} prompts answered by both models -> {samples_path}")


@click.command()
@path_option("--packed", "Output of pack (validation rows).")
@path_option("--manifest", "Names the base model.")
@path_option("--adapter", "Output of train.")
@path_option("--prompts", "Held-out prompts, one JSON object with 'prompt' a line.")
@path_option("--samples", "Both models' responses with their metrics.")
@path_option("--metrics", "Validation loss and friction metrics.")
def main(packed: Path, manifest: Path, adapter: Path, prompts: Path, samples: Path, metrics: Path) -> None:
    """Compare the base model with base + adapter."""
    recorded = environment.record("evaluate")  # warns before the work when the environment is not the lock's
    run(load_params(), packed, manifest, adapter, prompts, samples, metrics)
    environment.write_into(metrics, recorded)
