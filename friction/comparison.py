"""Base against adapter on paired answers: the `comparison`, per-category and over-friction figures of evaluate's
report, and of `friction score --compare` on any two answer files.

A sample is one answer of each model to one prompt: ``{"id", "prompt", "category", "base_metrics",
"adapter_metrics"}`` (``friction_metrics.score`` of each answer). Samples of the same prompt (same id and text) are
averaged first (a yes/no metric becomes the fraction of yes); the statistics are then over prompts
(friction/statistics.py). A yes/no metric uses the exact McNemar test only when every prompt has one sample.

Over-friction (``control_overfriction_rate``): the fraction of answers to `control` prompts, where the user is right
or asks for something reasonable, that push back or put a question back to the user. Lower is better.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from friction import friction_metrics, statistics

CONTROL = "control"
OVERFRICTION = "control_overfriction_rate"
VALIDATION_LOSS = "validation_loss"
# The metrics of the card's and `make compare`'s short tables, and of the per-category lines.
HEADLINE = ["answer_pushback_rate", "answer_questions_to_user", "answer_hedges_per_100_words", "think_closed_rate"]


def summary_name(key: str, value: object) -> str:
    """The name friction_metrics.summarize gives a score: booleans become rates."""
    return f"{key}_rate" if isinstance(value, bool) else key


def overfriction(metrics: dict) -> bool:
    """Push-back or a question back to the user: friction, a fault on a control prompt."""
    return bool(metrics["answer_pushback"]) or metrics["answer_questions_to_user"] > 0


def group_by_prompt(samples: list[dict]) -> list[list[dict]]:
    """The samples of each prompt (same id and prompt text), prompts in order of first appearance."""
    groups: dict[tuple, list[dict]] = {}
    for sample in samples:
        groups.setdefault((sample.get("id"), sample.get("prompt")), []).append(sample)
    return list(groups.values())


def _prompt_means(groups: list[list[dict]], side: str, value: Callable[[dict], float]) -> list[float]:
    return [float(np.mean([value(sample[f"{side}_metrics"]) for sample in group])) for group in groups]


def _compare_groups(groups: list[list[dict]], value: Callable[[dict], float], yes_no: bool, seed: int) -> dict:
    one_answer_each = all(len(group) == 1 for group in groups)
    return statistics.compare(
        _prompt_means(groups, "base", value),
        _prompt_means(groups, "adapter", value),
        seed,
        yes_no=yes_no and one_answer_each,
    )


def metric_names(samples: list[dict]) -> list[str]:
    """Every friction metric of the samples, the headline ones first."""
    names = [summary_name(key, value) for key, value in samples[0]["base_metrics"].items()]
    return [name for name in HEADLINE if name in names] + [name for name in names if name not in HEADLINE]


def _score_key(name: str, samples: list[dict]) -> tuple[str, bool]:
    """The score key behind a summary name, and whether it is yes/no."""
    first = samples[0]["base_metrics"]
    key = name.removesuffix("_rate") if name.endswith("_rate") and name.removesuffix("_rate") in first else name
    return key, isinstance(first[key], bool)


def friction_comparisons(samples: list[dict], seed: int) -> dict[str, dict]:
    """Every friction metric, and over-friction when there are control prompts; without Holm's correction."""
    groups = group_by_prompt(samples)
    comparisons = {}
    for name in metric_names(samples):
        key, yes_no = _score_key(name, samples)
        comparisons[name] = _compare_groups(groups, lambda metrics, key=key: float(metrics[key]), yes_no, seed)
    controls = [group for group in groups if group[0].get("category") == CONTROL]
    if controls:
        comparisons[OVERFRICTION] = _compare_groups(controls, lambda m: float(overfriction(m)), True, seed)
    return comparisons


def loss_comparison(base_losses: list[dict], adapter_losses: list[dict], seed: int) -> dict:
    """Token-weighted validation loss, compared per validation example (examples without a trained token left out)."""
    pairs = [(b, a) for b, a in zip(base_losses, adapter_losses, strict=True) if b["tokens"] > 0]
    tokens = [b["tokens"] for b, _ in pairs]
    return statistics.compare(
        [b["loss_sum"] / b["tokens"] for b, _ in pairs],
        [a["loss_sum"] / a["tokens"] for _, a in pairs],
        seed,
        weights=tokens,
    )


def comparison(samples: list[dict], seed: int, losses: tuple[list[dict], list[dict]] | None = None) -> dict:
    """The report's `comparison`: validation loss (when `losses` are given), then every friction metric and
    over-friction, Holm-corrected together, rounded."""
    entries = {VALIDATION_LOSS: loss_comparison(*losses, seed)} if losses else {}
    entries |= friction_comparisons(samples, seed)
    return statistics.rounded(statistics.with_holm(entries))


def by_category(samples: list[dict], seed: int) -> dict[str, dict]:
    """Per category: its number of prompts, and base, adapter, diff and 95 % interval of the headline metrics (and
    over-friction for controls). Descriptive: no p-values, the categories are small."""
    groups = group_by_prompt(samples)
    categories: dict[str, list[list[dict]]] = {}
    for group in groups:
        categories.setdefault(group[0].get("category") or "uncategorized", []).append(group)
    table = {}
    for category, members in categories.items():
        members_samples = [sample for group in members for sample in group]
        entry: dict = {"prompts": len(members)}
        for name in [name for name in HEADLINE if name in metric_names(members_samples)]:
            key, _ = _score_key(name, members_samples)
            entry[name] = _described(members, lambda metrics, key=key: float(metrics[key]), seed)
        if category == CONTROL:
            entry[OVERFRICTION] = _described(members, lambda m: float(overfriction(m)), seed)
        table[category] = entry
    return table


def _described(groups: list[list[dict]], value: Callable[[dict], float], seed: int) -> dict:
    base, adapter = _prompt_means(groups, "base", value), _prompt_means(groups, "adapter", value)
    if len(groups) < 2:  # one prompt: no interval over prompts
        return {"base": round(base[0], 4), "adapter": round(adapter[0], 4), "diff": round(adapter[0] - base[0], 4)}
    entry = statistics.compare(base, adapter, seed)
    return {
        "base": round(entry["base"], 4),
        "adapter": round(entry["adapter"], 4),
        "diff": round(entry["diff"], 4),
        "ci95": [round(bound, 4) for bound in entry["ci95"]],
    }


def samples_of_two_files(
    base_records: list[dict], base_field: str, adapter_records: list[dict], adapter_field: str
) -> list[dict]:
    """Paired samples from two answer files: matched by `id` (and `sample`) when every record of both has an id,
    else by position. Raises ValueError naming what does not pair."""

    def key(record: dict) -> tuple:
        return record["id"], record.get("sample")

    with_ids = all("id" in record for record in base_records + adapter_records)
    if with_ids:
        adapter_by_key = {key(record): record for record in adapter_records}
        missing = [key(record) for record in base_records if key(record) not in adapter_by_key]
        if missing or len(adapter_by_key) != len(base_records):
            raise ValueError(f"the files do not answer the same ids (first unpaired: {missing[:1] or 'in the second'})")
        pairs = [(record, adapter_by_key[key(record)]) for record in base_records]
    else:
        if len(base_records) != len(adapter_records):
            raise ValueError(
                f"{len(base_records)} and {len(adapter_records)} records: without an `id` in every record, answers "
                "are paired by position and the files must have as many"
            )
        pairs = list(zip(base_records, adapter_records))
    return [
        {
            "id": base.get("id", index),
            "prompt": base.get("prompt"),
            "category": base.get("category"),
            "base_metrics": friction_metrics.score(base[base_field]),
            "adapter_metrics": friction_metrics.score(adapter[adapter_field]),
        }
        for index, (base, adapter) in enumerate(pairs)
    ]
