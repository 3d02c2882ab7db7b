"""BENCHMARKS.md's CPU section, written from one `make bench` result (bench/run.py): every figure in it comes from the
raw JSON the section names. Between the two markers below; the rest of BENCHMARKS.md is left as it is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

START = "<!-- cpu-bench:start (written by make bench, bench/report.py) -->"
END = "<!-- cpu-bench:end -->"


def seconds(spread: dict[str, Any]) -> str:
    return f"{spread['median']:.3g} ({spread['min']:.3g}–{spread['max']:.3g})"


def rate(spread: dict[str, Any]) -> str:
    return f"{spread['median']:,.0f} ({spread['min']:,.0f}–{spread['max']:,.0f})"


def times(r: dict[str, Any]) -> str:
    return f"{r['median_ratio']:.2f}× ({r['min']:.2f}–{r['max']:.2f})"


def verdict(value: float, target: float, at_least: bool = True) -> str:
    met = value >= target if at_least else value <= target
    return "met" if met else f"**missed** ({value:.3g} vs {'≥' if at_least else '≤'} {target:.3g})"


def packing_section(packing: dict[str, Any]) -> list[str]:
    lines = [
        "### 1. Packing: `bfd` against the original's stacking and against TRL",
        "",
        "The original: next-fit stacking in mixed order, every row padded to `model.max_length`. Ours: best-fit-"
        "decreasing, padding-free rows. Slots are rows × max_length (what a trainer pays for); padded slots are the "
        'empty ones. TRL: `trl.data_utils.pack_dataset(dataset, max_length, "bfd")` on the same token ids.',
        "",
        "| corpus | examples | max_length | layout | rows | fill | padded slots | original / ours, row slots | original / ours, padded slots |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for name, label in (("demo", "demo mix (train split)"), ("card_scale", "card-scale synthetic")):
        part = packing[name]
        for layout, title in (("ours_bfd", "ours: bfd"), ("original_stacked", "original: stacked, padded")):
            row = part[layout]
            ratios = (
                f"{part['original_over_ours_row_slots']:.3f} | {part['original_over_ours_padded_slots']:.2f}"
                if layout == "ours_bfd"
                else " | "
            )
            lines.append(
                f"| {label} | {part['examples']:,} | {part['max_length']:,} | {title} | {row['rows']:,} | "
                f"{row['fill_ratio']:.3f} | {row['padded_slots']:,} | {ratios} |"
            )
    lines += [
        "",
        "| corpus | ours: rows, fill | TRL: rows, fill | ours s | TRL s | TRL / ours time |",
        "|---|---|---|---:|---:|---:|",
    ]
    for name, label in (("demo", "demo mix"), ("card_scale", "card-scale synthetic")):
        trl = packing[name]["against_trl"]
        lines.append(
            f"| {label} | {trl['ours_rows']['rows']:,}, {trl['ours_rows']['fill_ratio']:.3f} | "
            f"{trl['trl_rows']['rows']:,}, {trl['trl_rows']['fill_ratio']:.3f} | {seconds(trl['seconds']['ours'])} | "
            f"{seconds(trl['seconds']['trl'])} | {times(trl['trl_over_ours_seconds'])} |"
        )
    card = packing["card_scale"]
    lines += [
        "",
        f"Targets: fill ≥ 0.99 at card scale: {verdict(card['ours_bfd']['fill_ratio'], 0.99)}; "
        f"original / ours slots ≥ 1.2: row slots {verdict(card['original_over_ours_row_slots'], 1.2)}, "
        f"padded slots {verdict(card['original_over_ours_padded_slots'], 1.2)}.",
        "",
    ]
    return lines


def training_section(training: dict[str, Any]) -> list[str]:
    lines = [
        "### 2. Training: our train stage against the original collation and against bare TRL",
        "",
        "Same tiny model (the demo base), LoRA, batch and steps. Real (not padding) tokens/s, the median over "
        "optimizer steps with the first left out; ours is `python -m stages train` itself (its evaluation and checkpoints "
        "fall outside the steps; its whole-run rate with them is in the raw JSON).",
        "",
        "| lengths | steps | ours | bare TRL (same rows) | original collation | ours / original | ours / bare TRL | original / ours row slots |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    measured = [
        (name, label)
        for name, label in (("demo", "demo (1,024)"), ("card_like", "card-like (4,096)"))
        if name in training
    ]
    for name, label in measured:
        part = training[name]
        rates = part["tokens_per_s"]
        lines.append(
            f"| {label} | {part['steps']} | {rate(rates['ours'])} | {rate(rates['bare_trl'])} | "
            f"{rate(rates['original'])} | {times(part['ours_over_original'])} | {times(part['ours_over_bare_trl'])} | "
            f"{part['original_over_ours_row_slots']:.3f} |"
        )
    lines.append("")
    if "card_like" not in training:
        lines += ["Card-like lengths (4,096) were not measured in this run.", ""]
    for name, label in measured:
        part = training[name]
        target = 0.9 * part["original_over_ours_row_slots"]
        lines.append(
            f"- {label}: ours / original ≥ 0.9 × row slots saved ({target:.2f}): "
            f"{verdict(part['ours_over_original']['median_ratio'], target)}; ours / bare TRL ≥ 0.9: "
            f"{verdict(part['ours_over_bare_trl']['median_ratio'], 0.9)}."
        )
    return [*lines, ""]


def pipeline_section(pipeline: dict[str, Any]) -> list[str]:
    evaluation = pipeline["evaluation"]
    noop = pipeline["noop_repro_vs_status"]
    stages = pipeline["make_demo_seconds"]
    tokens = pipeline["tokenization"]
    generation = evaluation["one_at_a_time_over_batched_generation"]
    by_stage = ", ".join(
        f"{stage}: {counts['example_texts']} example texts, {counts['other_texts']} other texts"
        for stage, counts in tokens["texts_tokenized_by_stage"].items()
    )
    return [
        "### 3. Evaluation: batched generation against one prompt at a time",
        "",
        f"`python -m stages evaluate` answering {evaluation['prompts']} prompts (base and base + adapter), in one batch or one "
        "at a time; seconds from the probe around `generate` and `validation_loss`.",
        "",
        "| | batched | one at a time |",
        "|---|---:|---:|",
        f"| stage s | {seconds(evaluation['stage_seconds']['batched'])} | "
        f"{seconds(evaluation['stage_seconds']['one_at_a_time'])} |",
        f"| generation s | {seconds(evaluation['generation_seconds']['batched'])} | "
        f"{seconds(evaluation['generation_seconds']['one_at_a_time'])} |",
        f"| validation loss s | {seconds(evaluation['validation_loss_seconds']['batched'])} | "
        f"{seconds(evaluation['validation_loss_seconds']['one_at_a_time'])} |",
        "",
        f"One at a time / batched generation: {times(generation)}; target ≥ 3×: "
        f"{verdict(generation['median_ratio'], 3)}.",
        "",
        "### 4. Pipeline: `make demo` per stage, no-op `dvc repro` against `dvc status`",
        "",
        "| " + " | ".join(stages) + " |",
        "|" + "---:|" * len(stages),
        "| " + " | ".join(f"{value:.1f}" for value in stages.values()) + " |",
        "",
        f"No-op `dvc repro` {seconds(noop['repro'])} s, `dvc status` {seconds(noop['status'])} s: "
        f"{times(noop['repro_over_status'])}; target ≤ 2×: {verdict(noop['repro_over_status']['median_ratio'], 2, False)}.",
        "",
        "### 5. Tokenization passes per example, counted",
        "",
        f"Over the whole `dvc repro` of the demo, {tokens['examples']} examples: each tokenized between "
        f"{tokens['min_passes']} and {tokens['max_passes']} times (target exactly 1: "
        f"{'met' if tokens['min_passes'] == tokens['max_passes'] == 1 else '**missed**'}). Texts the fast tokenizer "
        f"encoded, by stage: {by_stage}. (mix also tokenizes the clean rows it does not sample, and a one-character "
        "probe for the BOS; evaluate tokenizes its prompts.)",
        "",
    ]


MEMORY_TARGET_GIB = 4.0  # mix and pack at a million examples, each


def scaling_section(scaling: dict[str, Any]) -> list[str]:
    lines = [
        "### 6. Scaling of mix and pack",
        "",
        "Synthetic sources of the demo's lengths (bench/corpus.py), the demo base's tokenizer, every clean row mixed "
        "(`mix.target_max` unbounded). Each stage a process of its own; peak memory is that process's maxrss. "
        '"in the tokenizer": the seconds mix spends in the fast tokenizer\'s encoding of its batches '
        "(`friction.tokens.encode_texts`, timed by bench/probe in the same run), and their share of mix's wall time.",
        "",
        "| examples | real tokens | mix s | in the tokenizer s | tokenizer share | pack s | peak GiB mix / pack |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for point in scaling["points"]:
        lines.append(
            f"| {point['examples']:,} | {point['real_tokens']:,} | {seconds(point['mix_seconds'])} | "
            f"{seconds(point['tokenizer_seconds'])} | {point['tokenizer_share']['median']:.0%} | "
            f"{seconds(point['pack_seconds'])} | "
            f"{point['mix_peak_gib']['median']:.2f} / {point['pack_peak_gib']['median']:.2f} |"
        )
    growth = "; ".join(f"{g['from']:,}→{g['to']:,}: mix n^{g['exponent']}" for g in scaling["mix_growth"])
    growth_pack = "; ".join(f"pack n^{g['exponent']}" for g in scaling["pack_growth"])
    memory = "; ".join(
        f"{m['from']:,}→{m['to']:,}: mix {m['mix_gib'] * 1024:.1f} MiB, pack {m['pack_gib'] * 1024:.1f} MiB"
        for m in scaling["memory_per_1000_examples"]
    )
    lines += ["", f"Growth of time: {growth}; {growth_pack}. Memory per 1,000 examples: {memory}.", ""]
    largest = scaling["points"][-1]
    if largest["examples"] >= 1_000_000:
        peak = max(largest["mix_peak_gib"]["median"], largest["pack_peak_gib"]["median"])
        lines += [
            f"Peak memory at {largest['examples']:,} examples under {MEMORY_TARGET_GIB:g} GiB each: "
            f"{verdict(peak, MEMORY_TARGET_GIB, at_least=False)}.",
            "",
        ]
    return lines


def section(result: dict[str, Any], raw: Path) -> str:
    machine = result["machine"]
    versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items())
    load_before = ", ".join(f"{x:.2f}" for x in machine["load_average"])
    load_after = ", ".join(f"{x:.2f}" for x in result["load_average_after"])
    lines = [
        START,
        "## CPU: `make bench`",
        "",
        f"Measured {result['started']} on {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, "
        f"Python {machine['python']}; {versions}. Raw results: [`{raw}`]({raw}). `make bench` took "
        f"{result['seconds']['total']:.0f} s.",
        "",
        f"Load average (1, 5, 15 min) before: {load_before}; after: {load_after}. "
        # The 1-minute figure at the start: the 5- and 15-minute ones still remember work that has ended.
        + (
            "Other work was running when it started (1-minute load above half the cores): absolute times are "
            "inflated; the ratios come from the two sides run in turn and are what to read."
            if machine["load_average"][0] > (machine["cores"] or 1) * 0.5
            else "The machine was otherwise idle."
        ),
        "",
        "Every comparison runs its two sides in the same `make bench`, interleaved (alternating which goes first), "
        "and gives the median and, in brackets, the range.",
        "",
        *packing_section(result["packing"]),
        *(
            training_section(result["training"])
            if "training" in result
            else ["### 2. Training", "", "Not measured in this run.", ""]
        ),
        *pipeline_section(result["pipeline"]),
        *scaling_section(result["scaling"]),
        END,
    ]
    return "\n".join(lines) + "\n"


def update_benchmarks(path: Path, result: dict[str, Any], raw: Path) -> None:
    """Replace the CPU section of BENCHMARKS.md (or put it after the title the first time)."""
    text = path.read_text()
    new = section(result, raw)
    if START in text and END in text:
        before, rest = text.split(START, 1)
        text = before + new + rest.split(END, 1)[1].lstrip("\n")
    else:
        title, _, body = text.partition("\n")
        text = f"{title}\n\n{new}\n{body.lstrip()}"
    path.write_text(text)
