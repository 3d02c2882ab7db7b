"""card: the adapter's Hugging Face model card, built with huggingface_hub's ModelCard from this run's files only.

Every figure comes from params.yaml, the fetch manifest or a stage's metrics; the template holds prose.
"""

from __future__ import annotations

from pathlib import Path

import click
from huggingface_hub import ModelCard, ModelCardData

from stages.artifacts import read_json
from stages.config import Params

TEMPLATE = Path(__file__).with_name("card_template.md")
LOSS_PLOT = "loss_curves.png"
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


def build(params: Params, metrics_dir: Path, manifest_path: Path, adapter_dir: Path) -> ModelCard:
    manifest = read_json(manifest_path)
    mix, pack = read_json(metrics_dir / "mix.json"), read_json(metrics_dir / "pack.json")
    train_metrics, evaluation = read_json(metrics_dir / "train.json"), read_json(metrics_dir / "evaluate.json")

    sources = {}
    for name, source in params.data.sources.items():
        sources[name] = {**manifest["sources"][name], **mix["sources"][name], "weight": params.mix.weights[name]}
    dropped: dict[str, int] = {}
    for counts in mix["sources"].values():
        for reason, count in counts["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + count
    base = manifest["base_model"]

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
        model_name=params.card.model_name,
        recipe=params.recipe,
        base_model=base["location"],
        base_revision=base["resolved_revision"],
        license=params.card.license,
        adapter_location=str(adapter_dir),
        system_prompt=params.mix.system_prompt,
        seed=params.seed,
        load_in_4bit=params.model.load_in_4bit,
        lora=params.lora,
        train=params.train,
        evaluate=params.evaluate,
        sources=sources,
        dropped=dict(sorted(dropped.items())),
        mix=mix,
        pack=pack,
        train_metrics=train_metrics,
        evaluation=evaluation,
        friction_keys=CARD_FRICTION_KEYS,
        loss_plot=LOSS_PLOT,
    )


def read_curve(path: Path) -> tuple[list[int], list[float]]:
    """One dvclive metric: its TSV has a header, then `step<TAB>value` rows."""
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line]
    return [int(step) for step, _ in rows], [float(value) for _, value in rows]


def plot_losses(live_dir: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display, and no font cache warnings from interactive backends
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4), dpi=100)
    for name, label in (("train/loss", "training loss"), ("eval/loss", "validation loss")):
        path = live_dir / "plots/metrics" / f"{name}.tsv"
        if path.is_file():
            axes.plot(*read_curve(path), marker="o" if name.startswith("eval") else None, label=label)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(out, metadata={"Software": None})
    pyplot.close(figure)


def run(
    params: Params, metrics_dir: Path, manifest_path: Path, adapter_dir: Path, live_dir: Path, card_path: Path
) -> None:
    plot_losses(live_dir, card_path.with_name(LOSS_PLOT))
    card = build(params, metrics_dir, manifest_path, adapter_dir)
    card.save(card_path)
    click.echo(f"card: {card_path}")
