"""card: built from a complete synthetic run (params, manifest, metrics, dvclive logs) with distinctive numbers;
every number on the card must trace back to one of those files."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from conftest import REPO
from huggingface_hub import ModelCard
from ruamel.yaml import YAML

from friction import comparison, judging, statistics
from friction.config import Params, load_params
from friction.friction_metrics import score, summarize
from friction.gguf_export import vllm_rank_for
from stages import card

# Numbers the template writes itself: the original card's citation year, the 95 % of the intervals and the 0.05
# level of Holm's correction (friction/statistics.py fixes both).
TEMPLATE_NUMBERS = {"2025", "95", "0.05"}
# A number as the card shows it: digits with thousands commas or a decimal part, or a version like 5.24.0; not the
# digits inside a word or name (Qwen-7B, v2, bf16, x86_64, a commit hash).
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:[.,]\d+)*(?:e[+-]?\d+)?(?!\w)")

PARAM_CHANGES = {
    "seed": 4242,
    "lora": {"rank": 24, "alpha": 56, "dropout": 0.035},
    "model": {"max_length": 3072},
    "train": {
        "epochs": 5,
        "max_steps": 987,
        "batch_size": 3,
        "grad_accum": 7,
        "learning_rate": 0.00037,
        "warmup_ratio": 0.06,
        "weight_decay": 0.013,
        "max_grad_norm": 0.45,
        "eval_steps": 45,
        "early_stopping_patience": 4,
        "early_stopping_threshold": 0.0065,
        "backend": "auto",
    },
    "evaluate": {"max_new_tokens": 777, "temperature": 0.65, "top_p": 0.93, "batch_size": 6},
}
SOURCE_NUMBERS = {  # name: (rows in the dataset, rows kept, rows sampled, tokens sampled, duplicates dropped)
    "disagreement": (2413, 2391, 731, 512347, 22),
    "overthinking": (1187, 1180, 731, 433219, 7),
    "reluctance_v61": (927, 927, 927, 301877, 0),
    "reluctance_v53": (611, 604, 604, 187763, 7),
}
TRAIN_METRICS = {
    "final_train_loss": 1.43217,
    "best_eval_loss": 1.52683,
    "best_eval_epoch": 3.5714,
    "epochs_run": 4.2857,
    "steps": 612,
    "stopped_early": True,
    "runtime_s": 2093.4,
    "train_tokens_per_s": 11873.6,
    "peak_memory_mb": 12043.7,
    "peak_memory_measure": "GPU memory allocated by torch",
    "trainable_parameters": 60555264,
    "backend": "unsloth",
    "device": "NVIDIA H100 80GB HBM3",
    "base_model": "unsloth/DeepSeek-R1-Distill-Qwen-7B-unsloth-bnb-4bit",
    "base_revision": "0f3c2a7e1b9d4c6a8e5f7b2d1c0a9e8f7d6c5b4a",
    "versions": {
        "python": "3.11.7",
        "torch": "2.13.0+cu128",
        "transformers": "5.17.0",
        "trl": "1.15.0",
        "peft": "0.21.2",
        "unsloth": "2026.10.9",
        "unsloth_zoo": "2026.10.9",
    },
}


def hex_revision(seed: int) -> str:
    return f"{seed:08x}" + "ab" * 16


def write_run(
    root: Path, *, source_tokens: bool = True, best_eval_loss: float | None = 1.52683, judge: dict | None = None
) -> dict[str, Path]:
    """A complete set of the files the card stage reads, as a run on the card recipe would leave them."""
    yaml_writer = YAML()
    params = yaml_writer.load(REPO / "recipes/card.yaml")
    for section, values in PARAM_CHANGES.items():
        if isinstance(values, dict):
            params[section].update(values)
        else:
            params[section] = values
    (root / "params.yaml").parent.mkdir(parents=True, exist_ok=True)
    yaml_writer.dump(params, root / "params.yaml")

    manifest = {
        "sources": {
            name: {
                "location": params["data"]["sources"][name]["hub"],
                "format": "friction",
                "requested_revision": "main",
                "resolved_revision": hex_revision(index),
                "rows": rows,
                "sha256": "e3b0c442" * 8,
            }
            for index, (name, (rows, *_)) in enumerate(SOURCE_NUMBERS.items())
        },
        "base_model": {
            "location": TRAIN_METRICS["base_model"],
            "requested_revision": "main",
            "resolved_revision": TRAIN_METRICS["base_revision"],
            "files": {"config.json": 1489},
        },
    }
    sources = {}
    for name, (rows, kept, sampled, tokens, duplicates) in SOURCE_NUMBERS.items():
        dropped = {"duplicate": duplicates} if duplicates else {}
        sources[name] = {
            "available": kept,
            "asked": 733,
            "sampled": sampled,
            "capped": sampled < 733,
            "rows_in": rows,
            "kept": kept,
            "dropped": dropped,
        }
        if source_tokens:
            sources[name]["tokens"] = tokens
    mix = {
        "sources": sources,
        "available": 5102,
        "asked": 3661,
        "sampled": 2993,
        "train": 2694,
        "validation": 299,
        "weights_sum": 1.0,
    }
    split = {
        "examples": 2694,
        "packed_examples": 2694,
        "truncated": 13,
        "dropped": 0,
        "rows": 1461,
        "real_tokens": 5386211,
        "trained_tokens": 4127734,
        "padded_slots": 483709,
        "fill_ratio": 0.9176,
    }
    pack = {"strategy": "bfd", "max_length": 3072, "train": split, "validation": {**split, "rows": 163}}
    base_texts = ["<think>Maybe, perhaps.</think>Sure, do it.", "<think>I think so</think>Go.", "Fine, go ahead."]
    adapter_texts = [
        "<think>Hmm</think>I disagree. Do you?",
        "<think>Wait</think>*sighs* Maybe not.",
        "I'm not convinced. Why now?",
    ]
    categories = ["risky_plan", "emotional", "control"]
    samples = [
        {
            "id": f"p{index}",
            "prompt": f"q{index}",
            "category": categories[index % 3],
            "sample": 0,
            "base_metrics": score(base_texts[index % 3]),
            "adapter_metrics": score(adapter_texts[index % 3]),
        }
        for index in range(23)
    ]
    loss = {
        "base": 1.9381,
        "adapter": 1.5187,
        "diff": -0.4194,
        "ci95": [-0.4713, -0.3702],
        "p": 0.0001,
        "p_holm": 0.0023,
        "n": 299,
    }
    evaluation = {
        "validation": {
            "tokens": 418223,
            "base_loss": 1.9381,
            "adapter_loss": 1.5187,
            "base_perplexity": 6.945,
            "adapter_perplexity": 4.566,
        },
        "friction": {
            "prompts": 23,
            "samples_per_prompt": 1,
            "base": summarize([s["base_metrics"] for s in samples]),
            "adapter": summarize([s["adapter_metrics"] for s in samples]),
            "categories": comparison.by_category(samples, seed=4242),
        },
        "comparison": {"validation_loss": loss, **comparison.comparison(samples, seed=4242)},
        "comparison_method": statistics.METHOD,
    }
    train = {**TRAIN_METRICS, "best_eval_loss": best_eval_loss}

    paths = {
        "params": root / "params.yaml",
        "manifest": root / "data/raw/manifest.json",
        "metrics": root / "metrics",
        "live": root / "dvclive",
        "adapter": root / "models/adapter",
        "card": root / "models/friction-adapter/README.md",
    }
    # What the card stage copies: train's output, here its config and a peft README the card must replace.
    paths["adapter"].mkdir(parents=True)
    (paths["adapter"] / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 24}))
    (paths["adapter"] / "README.md").write_text("peft's stub\n")
    for path, data in (
        (paths["manifest"], manifest),
        (paths["metrics"] / "mix.json", mix),
        (paths["metrics"] / "pack.json", pack),
        (paths["metrics"] / "train.json", train),
        (paths["metrics"] / "evaluate.json", evaluation),
        (paths["metrics"] / "judge.json", judge or {"enabled": False, "reason": "off"}),
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2))
    curves = {"train/loss": [(10, 2.3117), (20, 1.8734), (30, 1.4322)], "eval/loss": [(15, 1.7012), (30, 1.5268)]}
    for name, points in curves.items():
        path = paths["live"] / "plots/metrics" / f"{name}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("step\tloss\n" + "".join(f"{step}\t{value}\n" for step, value in points))
    return paths


def build_card(paths: dict[str, Path]) -> ModelCard:
    """Run the card stage from the run's root, with relative paths as dvc.yaml gives them."""
    params = load_params(paths["params"])
    root = paths["params"].parent
    with contextlib.chdir(root):
        relative = {name: path.relative_to(root) for name, path in paths.items()}
        card.run(
            params,
            relative["metrics"],
            relative["manifest"],
            relative["adapter"],
            relative["live"],
            relative["card"].parent,
        )
    return ModelCard.load(paths["card"])


@pytest.fixture(scope="module")
def run_files(tmp_path_factory) -> dict[str, Path]:
    return write_run(tmp_path_factory.mktemp("card-run"))


@pytest.fixture(scope="module")
def model_card(run_files) -> ModelCard:
    return build_card(run_files)


def leaves(data: Any) -> Iterator[Any]:
    if isinstance(data, dict):
        for value in data.values():
            yield from leaves(value)
    elif isinstance(data, list):
        for value in data:
            yield from leaves(value)
    else:
        yield data


def renderings(value: Any) -> set[str]:
    """The ways the template may print a value: as is, with thousands commas, rounded, or as a percentage."""
    if isinstance(value, str):
        return set(NUMBER.findall(value))  # numbers inside names and versions
    if isinstance(value, bool) or not isinstance(value, int | float):
        return set()
    shown = {str(value), f"{value:,}", f"{value:,.0f}", f"{100 * value:.1f}", f"{value:.2g}"}
    shown |= {f"{value:.{digits}f}" for digits in range(5)}
    return shown


def run_values(paths: dict[str, Path]) -> list[Any]:
    files = [yaml.safe_load(paths["params"].read_text()), json.loads(paths["manifest"].read_text())]
    files += [json.loads(path.read_text()) for path in sorted(paths["metrics"].glob("*.json"))]
    values = [value for data in files for value in leaves(data)]
    for tsv in (paths["live"] / "plots/metrics").rglob("*.tsv"):
        values += [float(cell) for line in tsv.read_text().splitlines()[1:] for cell in line.split("\t")]
    lora_rank = yaml.safe_load(paths["params"].read_text())["lora"]["rank"]
    values.append(vllm_rank_for([lora_rank], "params"))  # vLLM's --max-lora-rank: the rank rounded up to one it takes
    return values


def test_front_matter_has_the_hub_metadata(model_card: ModelCard, run_files):
    front_matter = yaml.safe_load(run_files["card"].read_text().split("---\n")[1])
    data = model_card.data
    assert front_matter["base_model"] == data.base_model == TRAIN_METRICS["base_model"]
    assert data.library_name == "peft"
    assert data.license == "apache-2.0"
    assert data.datasets == [
        f"leonvanbokhorst/{name}"
        for name in ("friction-disagreement-v2", "friction-overthinking-v2", "reluctance-v6.1", "reluctance-v5.3")
    ]
    assert {"lora", "peft", "ai-friction"} <= set(data.tags)


def test_every_number_on_the_card_comes_from_the_run(model_card: ModelCard, run_files):
    traceable = set().union(*(renderings(value) for value in run_values(run_files))) | TEMPLATE_NUMBERS
    numbers = NUMBER.findall(model_card.text)
    untraced = sorted(set(numbers) - traceable)
    assert not untraced, f"numbers on the card that no run file holds: {untraced}"
    assert len(numbers) > 80  # the card does show the run: a sanity check of the number pattern itself


def test_the_card_shows_the_run(model_card: ModelCard, run_files):
    text = model_card.text
    for expected in [
        "| disagreement | `leonvanbokhorst/friction-disagreement-v2` | 00000000abab",
        "| 2,413 | 2,391 | 0.2 | 731 (capped) | 512,347 |",
        "Rows dropped before sampling: disagreement: 22 duplicate; overthinking: 7 duplicate; reluctance_v53: 7 dup",
        "| backend | unsloth (`train.backend: auto`) |",
        "| hardware | NVIDIA H100 80GB HBM3 |",
        "| final training loss | 1.4322 |",
        "| best validation loss | 1.5268 (epoch 3.57) |",
        "| training runtime | 2093 s |",
        "| peak memory | 12,044 MiB (GPU memory allocated by torch) |",
        "| validation loss | 1.9381 | 1.5187 |",
        "unsloth 2026.10.9",
        "| LoRA rank, alpha, dropout | 24, 56.0, 0.035 |",
        "max_new_tokens=777,",
        "temperature=0.65,",
        "top_p=0.93,",
        "eos_token_id=tokenizer.eos_token_id,",
        "    '<|im_start|>system\\n'",
        "    '<|im_start|>assistant\\n'",
        f"![Training and validation loss by optimizer step]({card.LOSS_PLOT})",
        "## Limitations",
        "## Citation",
        "## Intended use",
        "## Bias and risks",
    ]:
        assert expected in text, expected
    assert run_files["card"].with_name(card.LOSS_PLOT).stat().st_size > 1000


def test_the_usage_prompt_is_the_training_format(model_card: ModelCard):
    from friction.chatml import generation_prompt

    snippet = model_card.text.split("```python\n")[1].split("```")[0]
    literal = snippet.split("prompt = (\n")[1].split("\n)\n")[0]
    params = Params.model_validate(yaml.safe_load((REPO / "recipes/card.yaml").read_text()))
    expected = generation_prompt(
        [{"role": "system", "content": params.mix.system_prompt}, {"role": "user", "content": card.USAGE_QUESTION}]
    )
    assert eval(f"({literal})") == expected  # the card's own string literal


def test_a_changed_metric_changes_the_card(model_card: ModelCard, tmp_path: Path):
    paths = write_run(tmp_path)
    train = json.loads((paths["metrics"] / "train.json").read_text())
    train["final_train_loss"] = 1.98771
    (paths["metrics"] / "train.json").write_text(json.dumps(train))
    changed = build_card(paths).text
    assert "| final training loss | 1.4322 |" in model_card.text
    assert "| final training loss | 1.9877 |" in changed and "| final training loss | 1.4322 |" not in changed


def test_figures_the_run_did_not_produce_are_left_out(tmp_path: Path):
    paths = write_run(tmp_path, source_tokens=False, best_eval_loss=None)
    for tsv in (paths["live"] / "plots/metrics").rglob("*.tsv"):
        tsv.unlink()
    text = build_card(paths).text
    assert "best validation loss" not in text
    assert "| weight | sampled |\n" in text and "tokens |" not in text.split("## Training data")[1].split("Packing")[0]
    assert card.LOSS_PLOT not in text
    assert paths["card"].with_name(card.LOSS_PLOT).is_file()  # DVC declares the image; it is written all the same


def test_the_card_stage_writes_one_publishable_folder(model_card: ModelCard, run_files):
    """The adapter folder train wrote, copied whole, with the card (not peft's stub) and the loss plot beside it."""
    published = run_files["card"].parent
    assert {path.name for path in published.iterdir()} == {"adapter_config.json", card.CARD, card.LOSS_PLOT}
    assert (published / "adapter_config.json").read_bytes() == (
        run_files["adapter"] / "adapter_config.json"
    ).read_bytes()
    assert 'PeftModel.from_pretrained(base, "models/friction-adapter")' in model_card.text


def test_no_card_without_a_trained_adapter(run_files, tmp_path: Path):
    params = load_params(run_files["params"])
    with pytest.raises(click.ClickException, match="no adapter_config.json; run the train stage first"):
        card.run(
            params, run_files["metrics"], run_files["manifest"], tmp_path / "none", run_files["live"], tmp_path / "out"
        )
    assert not (tmp_path / "out").exists()


def test_the_card_shows_the_paired_differences_and_what_holds(model_card: ModelCard, run_files):
    text = model_card.text
    evaluation = json.loads((run_files["metrics"] / "evaluate.json").read_text())
    pushback = evaluation["comparison"]["answer_pushback_rate"]
    assert "| metric | base | base + adapter | difference [95 % CI] | p | p (Holm) | n |" in text
    assert "| validation loss | 1.9381 | 1.5187 | -0.4194 [-0.4713, -0.3702] | 0.0001 | 0.0023 | 299 |" in text
    low, high = pushback["ci95"]
    assert (
        f"| answer_pushback_rate | {pushback['base']:.4f} | {pushback['adapter']:.4f} | {pushback['diff']:+.4f} "
        f"[{low:+.4f}, {high:+.4f}] | {pushback['p']:.2g} | {pushback['p_holm']:.2g} | 23 |"
    ) in text
    holding = text.split("Differences that hold after Holm's correction (p (Holm) < 0.05): ")[1].split(".\n")[0]
    assert "validation_loss (-0.4194)" in holding and "answer_pushback_rate" in holding
    assert "think_closed_rate" not in holding  # no difference: all answers close their think block (or have none)
    assert "10,000 resamples" in text and "exact McNemar" in text
    overfriction = evaluation["comparison"]["control_overfriction_rate"]
    assert f"**Over-friction** (lower is better): on the {overfriction['n']} control prompts" in text
    assert "| control | 7 |" in text and "| risky_plan | 8 |" in text  # the per-category lines
    assert "**Judge**" not in text  # the judge was off


def test_the_card_shows_the_judge_when_it_ran(tmp_path: Path):
    results = [{"id": f"p{i}", "outcome": outcome} for i, outcome in enumerate(["win"] * 9 + ["loss"] * 3 + ["tie"])]
    report = {
        "enabled": True,
        "model": "Qwen/Qwen2.5-7B-Instruct",
        "verdict": "text",
        "rubric": "r.md",
        "requests_sent": 26,
        **judging.summary(results + [{"id": "p99", "outcome": "unscored"}], seed=1),
    }
    paths = write_run(tmp_path, judge=report)
    text = build_card(paths).text
    assert "**Judge**: `Qwen/Qwen2.5-7B-Instruct` compared the answers" in text
    assert "Of 14 answer pairs the\nadapter won 9, tied 1 and lost 3; 1 had no valid verdict (unscored)." in text
    win = report["win_rate"]
    assert f"win rate {win['value']:.4f} [{win['ci95'][0]:.4f}, {win['ci95'][1]:.4f}]" in text
    traceable = set().union(*(renderings(value) for value in run_values(paths))) | TEMPLATE_NUMBERS
    assert not sorted(set(NUMBER.findall(text)) - traceable)


def test_the_card_gives_the_vllm_and_transformers_serve_commands(model_card: ModelCard):
    vllm = (
        "vllm serve unsloth/DeepSeek-R1-Distill-Qwen-7B-unsloth-bnb-4bit --enable-lora --lora-modules "
        "friction=models/friction-adapter --max-lora-rank 32 --tokenizer models/friction-adapter"
    )
    assert vllm in model_card.text  # rank 24 is above vLLM's default 16 and not a value it accepts: 32
    assert "`friction merge --out merged/`, then `transformers serve merged/`" in model_card.text
