"""evaluate: the base model against base + adapter, on the same validation rows and the same held-out prompts.

Validation loss is the token-weighted mean over exactly the labels the trainer used (packed rows, per-example
positions, cache off so packed examples cannot see each other); each validation example's loss under both models is
saved too, for the paired statistics. Generation uses the project's own held-out prompts (each with a `category`),
`evaluate.samples_per_prompt` answers to each, every (prompt, sample) row with its own seed, in left-padded batches
that mix prompts and samples, with the decoding settings of `evaluate` in params.yaml; it stops each response at
<|im_end|>, the tokenizer's EOS id as in training (`stop_settings`). Both responses are scored with the friction
metrics and saved side by side.

metrics/evaluate.json's `comparison` compares adapter with base per prompt (metrics averaged over a prompt's
samples first) and per validation example: mean difference, 95 % bootstrap interval, p-value and Holm's correction
(friction/statistics.py). Over-friction, push-back or a question put back to the user on a `control` prompt (one where
the user is right or asks for something reasonable), is its own line: lower is better.
The adapter is loaded with transformers + peft whichever backend trained it: it is a plain PEFT adapter either way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import click
import numpy as np
import torch
from datasets import Dataset
from peft import PeftModel
from safetensors import SafetensorError, safe_open
from tqdm import tqdm
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteriaList,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
    set_seed,
)

from friction import comparison, environment, friction_metrics, statistics
from friction.artifacts import write_json
from friction.chatml import IGNORE_INDEX, IM_END, generation_prompt
from friction.config import Params, load_params
from friction.modeling import load_base_model
from friction.pipeline import path_option
from friction.schemas import PACKED_SCHEMA, read_parquet
from friction.tokens import end_of_turn_id


def position_ids(seq_lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(length) for length in seq_lengths])


@torch.no_grad()
def example_losses(model, rows: Dataset, device: torch.device, label: str) -> list[dict]:
    """Summed cross-entropy and trained-token count of every example of every packed row (examples with no trained
    token included, with 0 tokens): `row`, `example` (its place in the row), `tokens`, `loss_sum`."""
    examples = []
    for row_index, row in enumerate(tqdm(rows, desc=f"evaluate: validation loss, {label}", unit="row")):
        input_ids = torch.tensor([row["input_ids"]], device=device)
        positions = position_ids(row["seq_lengths"]).unsqueeze(0).to(device)
        labels = torch.tensor([row["labels"]], device=device)
        labels[positions == 0] = IGNORE_INDEX  # the first token of an example is never predicted from the previous one
        logits = model(input_ids=input_ids, position_ids=positions, use_cache=False).logits.float()
        targets = labels[0, 1:]
        token_losses = torch.nn.functional.cross_entropy(
            logits[0, :-1], targets, ignore_index=IGNORE_INDEX, reduction="none"
        )
        # Target t is the token at t + 1: it belongs to the example holding position t + 1.
        example_of_target = torch.repeat_interleave(
            torch.arange(len(row["seq_lengths"])), torch.tensor(row["seq_lengths"])
        )[1:].to(device)
        trained = targets != IGNORE_INDEX
        for example_index in range(len(row["seq_lengths"])):
            mine = trained & (example_of_target == example_index)
            examples.append(
                {
                    "row": row_index,
                    "example": example_index,
                    "tokens": int(mine.sum()),
                    "loss_sum": float(token_losses[mine].sum()),
                }
            )
    return examples


def validation_loss(model, rows: Dataset, device: torch.device, label: str) -> tuple[float, int]:
    """Mean cross-entropy per trained token, and the number of trained tokens."""
    examples = example_losses(model, rows, device, label)
    count = sum(example["tokens"] for example in examples)
    return sum(example["loss_sum"] for example in examples) / max(count, 1), count


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


def samples_per_prompt(params: Params) -> int:
    """Greedy decoding gives one answer per prompt, however many samples are asked for."""
    return 1 if params.evaluate.temperature == 0 else params.evaluate.samples_per_prompt


def row_seed(seed: int, prompt_number: int, sample: int) -> int:
    """The seed of one (prompt, sample) row: the same for base and adapter, whatever batch the row lands in."""
    return int(np.random.SeedSequence([seed, prompt_number, sample]).generate_state(1)[0])


class RowSeededSampler(LogitsProcessor):
    """Samples the next token of every row of a batch from that row's own seeded generator.

    generate() has one random stream for a whole batch, so a row's answer would depend on the other rows batched
    with it. This processor applies the temperature and top-p of params itself, draws each row's token with its own
    generator and leaves only that token possible; generate() then decodes greedily. A row's answer so depends on its
    seed alone (and base and adapter draw the same random numbers for the same row: a paired comparison).
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device: torch.device) -> None:
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        self.warpers = [TemperatureLogitsWarper(temperature)] + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        probabilities = torch.softmax(scores.float(), dim=-1)
        chosen = torch.cat(
            [
                torch.multinomial(probabilities[row], 1, generator=generator)
                for row, generator in enumerate(self.generators)
            ]
        )
        forced = torch.full_like(scores, -math.inf)
        forced[torch.arange(len(chosen)), chosen] = 0.0
        return forced


def response_text(tokenizer, ids: torch.Tensor) -> str:
    """A generated turn as text, cut at its end (a row of a batch that finished early goes on with padding)."""
    text = tokenizer.decode(ids, skip_special_tokens=False)
    for end_marker in (IM_END, tokenizer.eos_token, tokenizer.pad_token):
        if end_marker:
            text = text.split(end_marker)[0]
    return text.strip()


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    params: Params,
    device: torch.device,
    label: str,
    seeds: list[int] | None = None,
) -> list[str]:
    """Responses to `prompts` in batches of evaluate.batch_size; the tokenizer must pad on the left.

    With `seeds` (one a prompt) and sampling, each row samples from its own seeded generator (`RowSeededSampler`);
    without, from one stream seeded with params.seed.
    """
    settings = params.evaluate
    set_seed(params.seed)  # both models sample from the same random stream
    stop = stop_settings(tokenizer)
    per_row = seeds is not None and settings.temperature > 0
    responses = []
    batches = range(0, len(prompts), settings.batch_size)
    for start in tqdm(batches, desc=f"evaluate: generating, {label}", unit="batch"):
        # The tokenizer's own special tokens (its BOS) as in the training data.
        batch = tokenizer(prompts[start : start + settings.batch_size], return_tensors="pt", padding=True).to(device)
        sampling: dict = decoding(params)
        if per_row:
            sampler = RowSeededSampler(
                seeds[start : start + settings.batch_size], settings.temperature, settings.top_p, device
            )
            sampling = {"do_sample": False, "logits_processor": LogitsProcessorList([sampler])}
        output = model.generate(
            **batch,
            max_new_tokens=settings.max_new_tokens,
            **stop,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
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
                category = record.get("category", UNCATEGORIZED)
                if not isinstance(category, str) or not category.strip():
                    raise ValueError(f"'category' must be a non-empty string, got {category!r}")
            except (json.JSONDecodeError, ValueError, AttributeError) as error:
                raise click.ClickException(f"{path} line {line_number}: {error}") from None
            prompts.append({**record, "category": category, "number": len(prompts)})
    if not prompts:
        raise click.ClickException(f"{path}: no prompts")
    return select_prompts(prompts, limit)


UNCATEGORIZED = "uncategorized"
CONTROL = "control"  # prompts where the user is right or asks for something reasonable: friction there is a fault


def select_prompts(prompts: list[dict], limit: int | None) -> list[dict]:
    """`limit` prompts taken in turn from each category (in the order categories first appear), in file order."""
    if limit is None or limit >= len(prompts):
        return prompts
    by_category: dict[str, list[dict]] = {}
    for prompt in prompts:
        by_category.setdefault(prompt["category"], []).append(prompt)
    chosen: list[dict] = []
    for rank in range(max(map(len, by_category.values()))):
        chosen += [members[rank] for members in by_category.values() if rank < len(members)]
    return sorted(chosen[:limit], key=lambda prompt: prompt["number"])


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


def scored(rows: list[dict], base_responses: list[str], adapter_responses: list[str]) -> list[dict]:
    """One record per (prompt, sample): both answers and their friction scores."""
    return [
        {
            "id": row["prompt"].get("id"),
            "category": row["prompt"]["category"],
            "sample": row["sample"],
            "seed": row["seed"],
            "prompt": row["prompt"]["prompt"],
            "base_response": base_response,
            "adapter_response": adapter_response,
            "base_metrics": friction_metrics.score(base_response),
            "adapter_metrics": friction_metrics.score(adapter_response),
        }
        for row, base_response, adapter_response in zip(rows, base_responses, adapter_responses, strict=True)
    ]


def report(
    losses: dict[str, float],
    tokens: int,
    samples: list[dict],
    seed: int,
    example_losses_by_model: tuple[list[dict], list[dict]] | None = None,
) -> dict:
    prompts = len(comparison.group_by_prompt(samples))
    return {
        "validation": {
            "tokens": tokens,
            **{f"{label}_loss": round(loss, 4) for label, loss in losses.items()},
            **{f"{label}_perplexity": round(math.exp(loss), 3) for label, loss in losses.items()},
        },
        "friction": {
            "prompts": prompts,
            "samples_per_prompt": len(samples) // prompts,
            "base": friction_metrics.summarize([s["base_metrics"] for s in samples]),
            "adapter": friction_metrics.summarize([s["adapter_metrics"] for s in samples]),
            "categories": comparison.by_category(samples, seed),
        },
        "comparison": comparison.comparison(samples, seed, example_losses_by_model),
        "comparison_method": statistics.METHOD,
    }


def generation_rows(prompts: list[dict], params: Params) -> list[dict]:
    """Every (prompt, sample) to answer, prompt by prompt, each with its seed."""
    return [
        {"prompt": prompt, "sample": sample, "seed": row_seed(params.seed, prompt["number"], sample)}
        for prompt in prompts
        for sample in range(samples_per_prompt(params))
    ]


def write_losses(path: Path, base: list[dict], adapter: list[dict]) -> None:
    """Each validation example's trained tokens and mean loss under both models, one JSON object a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for base_example, adapter_example in zip(base, adapter, strict=True):
            tokens = base_example["tokens"]
            handle.write(
                json.dumps(
                    {
                        "row": base_example["row"],
                        "example": base_example["example"],
                        "tokens": tokens,
                        "base_loss": base_example["loss_sum"] / tokens if tokens else None,
                        "adapter_loss": adapter_example["loss_sum"] / tokens if tokens else None,
                    }
                )
                + "\n"
            )


def run(
    params: Params,
    packed_dir: Path,
    manifest_path: Path,
    adapter_dir: Path,
    prompts_path: Path,
    samples_path: Path,
    metrics_path: Path,
    losses_path: Path,
) -> None:
    prompts = read_prompts(prompts_path, params.evaluate.max_prompts)
    check_adapter(adapter_dir)  # everything that can fail on a user's file fails before the base model loads
    rows = validation_rows(packed_dir / "validation.parquet")
    model, tokenizer, device = load_models(params, manifest_path, adapter_dir)

    with model.disable_adapter():
        base_examples = example_losses(model, rows, device, "base")
    adapter_examples = example_losses(model, rows, device, "base + adapter")
    tokens = sum(example["tokens"] for example in base_examples)
    base_loss = sum(example["loss_sum"] for example in base_examples) / max(tokens, 1)
    adapter_loss = sum(example["loss_sum"] for example in adapter_examples) / max(tokens, 1)
    click.echo(f"evaluate: validation loss base {base_loss:.4f} -> adapter {adapter_loss:.4f} ({tokens} tokens)")
    write_losses(losses_path, base_examples, adapter_examples)

    system = {"role": "system", "content": params.mix.system_prompt}
    answer_rows = generation_rows(prompts, params)
    texts = [generation_prompt([system, {"role": "user", "content": row["prompt"]["prompt"]}]) for row in answer_rows]
    seeds = [row["seed"] for row in answer_rows]
    with model.disable_adapter():
        base_responses = generate(model, tokenizer, texts, params, device, "base", seeds)
    adapter_responses = generate(model, tokenizer, texts, params, device, "base + adapter", seeds)

    samples = scored(answer_rows, base_responses, adapter_responses)
    samples_path.parent.mkdir(parents=True, exist_ok=True)
    with samples_path.open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(sample, ensure_ascii=False) + "\n" for sample in samples)
    evaluation = report(
        {"base": base_loss, "adapter": adapter_loss}, tokens, samples, params.seed, (base_examples, adapter_examples)
    )
    write_json(metrics_path, evaluation)
    click.echo(
        f"evaluate: {len(prompts)} prompts x {samples_per_prompt(params)} samples answered by both models "
        f"-> {samples_path}"
    )
    for line in comparison_lines(evaluation["comparison"]):
        click.echo(f"evaluate: {line}")


def comparison_lines(comparisons: dict[str, dict]) -> list[str]:
    """One line per metric: base -> adapter, the difference with its interval, p and Holm's p."""
    return [
        f"{name}: {entry['base']:.4g} -> {entry['adapter']:.4g}, diff {entry['diff']:+.4g} "
        f"[{entry['ci95'][0]:+.4g}, {entry['ci95'][1]:+.4g}], p {entry['p']:.3g}, Holm {entry['p_holm']:.3g}, "
        f"n {entry['n']}" + (" (holds)" if statistics.holds(entry) else "")
        for name, entry in comparisons.items()
    ]


@click.command()
@path_option("--packed", "Output of pack (validation rows).")
@path_option("--manifest", "Names the base model.")
@path_option("--adapter", "Output of train.")
@path_option("--prompts", "Held-out prompts, one JSON object with 'prompt' a line.")
@path_option("--samples", "Both models' responses with their metrics.")
@path_option("--metrics", "Validation loss and friction metrics.")
@path_option("--losses", "Each validation example's loss under both models (JSON Lines).")
def main(
    packed: Path, manifest: Path, adapter: Path, prompts: Path, samples: Path, metrics: Path, losses: Path
) -> None:
    """Compare the base model with base + adapter."""
    recorded = environment.record("evaluate")  # warns before the work when the environment is not the lock's
    run(load_params(), packed, manifest, adapter, prompts, samples, metrics, losses)
    environment.write_into(metrics, recorded)
