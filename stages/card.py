"""card: the publishable model folder, the trained adapter with its Hugging Face model card and loss curves.

The folder is one DVC output and the `friction-adapter` artifact of dvc.yaml: `dvc pull`, `dvc artifacts get`,
`friction chat/merge/push` all take it whole. The card is built with huggingface_hub's ModelCard from this run's
files only.

Every figure comes from params.yaml, the fetch manifest, a stage's metrics or dvclive's logs; the template holds
prose and formatting. A figure the run did not produce (a validation loss never measured, per-source token counts
an older mix did not write, loss curves never logged) is left out rather than shown empty.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import click
from huggingface_hub import ModelCard, ModelCardData

from friction import comparison, statistics
from friction.artifacts import atomic_output, read_json
from friction.chatml import generation_prompt
from friction.config import Params, load_params
from friction.gguf_export import configured_ranks, vllm_rank_for
from friction.pipeline import path_option

TEMPLATE = Path(__file__).with_name("card_template.md")
CARD = "README.md"
LOSS_PLOT = "loss_curves.png"
LOSS_CURVES = (("train/loss", "training loss"), ("eval/loss", "validation loss"))
USAGE_QUESTION = "I'm sure quitting my job tomorrow is the right call, everyone says so..."
# The friction metrics shown on the card; the full set is in metrics/evaluate.json.
CARD_FRICTION_KEYS = [
    "answer_pushback_rate",
    "answer_questions_to_user",
    "answer_hedges_per_100_words",
    "answer_boosters_per_100_words",
    "answer_gestures",
    "think_hedges_per_100_words",
    "think_closed_rate",
    "think_words",
    "answer_words",
    "think_answer_word_ratio",
]


def comparison_rows(evaluation: dict) -> list[dict[str, Any]]:
    """The card's table of paired differences: validation loss, the headline metrics, over-friction, then the other
    card metrics, each with its name and whether it holds after Holm's correction."""
    compared = evaluation["comparison"]
    order = [comparison.VALIDATION_LOSS, *comparison.HEADLINE, comparison.OVERFRICTION, *CARD_FRICTION_KEYS]
    names = [name for name in dict.fromkeys(order) if name in compared]
    return [{"name": name, **compared[name], "holds": statistics.holds(compared[name])} for name in names]


def judge_report(metrics_dir: Path) -> dict | None:
    """metrics/judge.json when the judge ran and scored something; None when it was off."""
    path = metrics_dir / "judge.json"
    if not path.is_file():
        return None
    report = read_json(path)
    return report if report.get("enabled") and report.get("prompts_scored") else None


def source_rows(params: Params, manifest: dict, mix: dict) -> list[dict[str, Any]]:
    """One row of the card's data table per source: where it came from, what mix kept and drew from it."""
    return [
        {"name": name, **manifest["sources"][name], **mix["sources"][name], "weight": params.mix.weights[name]}
        for name in params.data.sources
    ]


def dropped_rows(mix: dict) -> dict[str, dict[str, int]]:
    """Rows mix dropped before sampling, by source and reason, for the sources that lost any."""
    sources = mix["sources"].items()
    return {name: counts["dropped"] for name, counts in sources if any(counts.get("dropped", {}).values())}


def python_string_lines(text: str) -> str:
    """`text` as the lines of a parenthesised Python string literal, one source line per line of text."""
    return "\n".join(f"    {line!r}" for line in text.splitlines(keepends=True))


def build(
    params: Params, metrics_dir: Path, manifest_path: Path, adapter_dir: Path, out_dir: Path, loss_plot: str | None
) -> ModelCard:
    """The card of the adapter trained in `adapter_dir`, published in `out_dir`; `loss_plot` names the loss-curve
    image beside it, or is None when there are no curves. The judge's results are shown when metrics/judge.json says
    it ran."""
    manifest = read_json(manifest_path)
    mix, pack = read_json(metrics_dir / "mix.json"), read_json(metrics_dir / "pack.json")
    train_metrics, evaluation = read_json(metrics_dir / "train.json"), read_json(metrics_dir / "evaluate.json")
    sources = source_rows(params, manifest, mix)
    base = manifest["base_model"]
    adapter_config = read_json(adapter_dir / "adapter_config.json")
    usage_prompt = generation_prompt(
        [{"role": "system", "content": params.mix.system_prompt}, {"role": "user", "content": USAGE_QUESTION}]
    )

    card_data = ModelCardData(
        base_model=base["location"],
        library_name="peft",
        license=params.card.license,
        datasets=[s.hub for s in params.data.sources.values() if s.hub] or None,
        language=["en"],
        pipeline_tag="text-generation",
        tags=["lora", "peft", "trl", "sft", *params.card.tags],
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        params=params,
        base_model=base["location"],
        base_revision=base["resolved_revision"],
        adapter_location=str(out_dir),
        sources=sources,
        source_tokens=all("tokens" in source for source in sources),
        dropped=dropped_rows(mix),
        mix=mix,
        pack=pack,
        train_metrics=train_metrics,
        evaluation=evaluation,
        friction_keys=[key for key in CARD_FRICTION_KEYS if key in evaluation["friction"]["base"]],
        compared=comparison_rows(evaluation),
        holding=[row for row in comparison_rows(evaluation) if row["holds"]],
        metrics_compared=len(evaluation["comparison"]),
        method=evaluation["comparison_method"],
        categories=evaluation["friction"].get("categories", {}),
        headline=comparison.HEADLINE,
        overfriction=evaluation["comparison"].get(comparison.OVERFRICTION),
        judge=judge_report(metrics_dir),
        usage_prompt=python_string_lines(usage_prompt),
        loss_plot=loss_plot,
        vllm_rank=vllm_rank_for(configured_ranks(adapter_config), adapter_dir / "adapter_config.json"),
    )


def read_curve(path: Path) -> tuple[list[int], list[float]]:
    """One dvclive metric: its TSV has a header, then `step<TAB>value` rows."""
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line]
    return [int(step) for step, _ in rows], [float(value) for _, value in rows]


def logged_curves(live_dir: Path) -> list[tuple[Path, str]]:
    """The loss curves dvclive logged: (TSV path, legend label)."""
    curves = [(live_dir / "plots/metrics" / f"{name}.tsv", label) for name, label in LOSS_CURVES]
    return [(path, label) for path, label in curves if path.is_file()]


def plot_losses(curves: list[tuple[Path, str]], out: Path) -> None:
    """Draw `curves` into `out`. The file is written even without a curve, since DVC expects it; the card shows it
    only when it holds one."""
    import matplotlib

    matplotlib.use("Agg")  # no display, and no font cache warnings from interactive backends
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4), dpi=100)
    for path, label in curves:
        axes.plot(*read_curve(path), marker="o" if path.parent.name == "eval" else None, label=label)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    if curves:
        axes.legend()
    else:
        axes.set_title("no loss was logged")
    figure.tight_layout()
    figure.savefig(out, metadata={"Software": None})
    pyplot.close(figure)


def run(
    params: Params, metrics_dir: Path, manifest_path: Path, adapter_dir: Path, live_dir: Path, out_dir: Path
) -> None:
    """Copy the trained adapter folder to `out_dir` and add the card and the loss plot; all or nothing."""
    if not (adapter_dir / "adapter_config.json").is_file():
        raise click.ClickException(
            f"{adapter_dir}: no adapter_config.json; run the train stage first (dvc repro train)"
        )
    curves = logged_curves(live_dir)
    card = build(params, metrics_dir, manifest_path, adapter_dir, out_dir, LOSS_PLOT if curves else None)
    with atomic_output(out_dir) as scratch:
        shutil.copytree(adapter_dir, scratch)
        (scratch / CARD).unlink(missing_ok=True)
        plot_losses(curves, scratch / LOSS_PLOT)
        card.save(scratch / CARD)
    click.echo(f"card: {out_dir / CARD}; the publishable model is {out_dir}/")


@click.command()
@path_option("--metrics-dir", "Metrics of mix, pack, train and evaluate.")
@path_option("--manifest", "Output of fetch.")
@path_option("--adapter", "Output of train: the adapter and its tokenizer.")
@path_option("--live", "dvclive logs of train (loss curves).")
@path_option("--out", "The publishable model folder: the adapter, its tokenizer, README.md (the card), the loss plot.")
def main(metrics_dir: Path, manifest: Path, adapter: Path, live: Path, out: Path) -> None:
    """Write the publishable model folder: the trained adapter with its model card and loss curves."""
    run(load_params(), metrics_dir, manifest, adapter, live, out)
