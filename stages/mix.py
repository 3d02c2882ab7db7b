"""mix: normalise every source row to one conversation schema, sample the mixture, split train/validation.

Each row becomes {"id", "source", "messages": [system, user, assistant]} with the reasoning in a <think> block.
Rows that cannot be trained on are dropped with a reason (or stop the stage with `mix.on_bad_rows: fail`), so the
report accounts for every input row: rows in = kept + dropped. Sampling follows the original code: ask for
min(target_max, int(target_fraction x clean rows)) examples, n_i = min(int(asked x weight_i), rows_i), each source
shuffled with the seed and cut, the union shuffled again. The split is by example, before packing, so no example
can be in both splits.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import click
from datasets import Dataset, concatenate_datasets

from stages.artifacts import atomic_output, read_json, write_json
from stages.chatml import IM_END, IM_START, THINK_CLOSE, THINK_OPEN, assistant_content, render
from stages.config import Params

GENERATOR_ERROR = re.compile(r"^\s*Error:")
CHATML_TURN = re.compile(re.escape(IM_START) + r"(system|user|assistant)\n(.*?)\n?" + re.escape(IM_END), re.S)


class BadRow(Exception):
    """A row that cannot become a training example: `kind` names the reason in reports, the message details it."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


@dataclass(frozen=True)
class Example:
    id: str
    source: str
    messages: list[dict[str, str]]


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:  # a Hub dataset's Arrow table turns a missing field into null
        raise BadRow("missing_field", f"missing field '{key}'")
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"field '{key}' is {type(value).__name__}, not a string")
    if not value.strip():
        raise BadRow("empty_field", f"empty field '{key}'")
    if GENERATOR_ERROR.match(value):
        raise BadRow("generator_error", f"generator error in '{key}'")
    return value


def friction_messages(row: dict, system_prompt: str) -> list[dict[str, str]]:
    """friction-* rows: a question, five agents' thought streams, a final answer (original-recipe.md section 3)."""
    question = _text(row, "question")
    agents = row.get("agent_responses")
    if agents is None:
        raise BadRow("missing_field", "missing field 'agent_responses'")
    if not isinstance(agents, list) or not all(isinstance(agent, dict) for agent in agents):
        raise BadRow("wrong_type", "field 'agent_responses' is not a list of objects")
    if not agents:
        raise BadRow("empty_field", "empty field 'agent_responses'")
    thoughts = "\n\n".join(_text(agent, "thought_stream") for agent in agents)
    answer = _text(row, "final_answer")
    return [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": question},
        {"role": "assistant", "content": assistant_content(thoughts, answer)},
    ]


def reluctance_messages(row: dict) -> list[dict[str, str]]:
    """reluctance-* rows: a whole ChatML conversation in `text`, reasoning in a <judging> block."""
    text = _text(row, "text").replace("<judging>", THINK_OPEN).replace("</judging>", THINK_CLOSE)
    messages = [{"role": role, "content": content} for role, content in CHATML_TURN.findall(text)]
    if not any(message["role"] == "assistant" for message in messages):
        raise BadRow("no_assistant_turn", "no assistant turn in 'text'")
    for message in messages:
        reply = message["content"].rpartition(THINK_CLOSE)[2]
        if not message["content"].strip() or not reply.strip():
            raise BadRow("empty_field", f"empty {message['role']} turn in 'text'")
        if GENERATOR_ERROR.match(reply.lstrip("\n")):
            raise BadRow("generator_error", f"generator error in {message['role']} turn of 'text'")
    return messages


def read_source(path: Path, name: str, source_format: str, system_prompt: str) -> tuple[list[Example], list[dict]]:
    """Parse one fetched source; return its examples and a record for every row dropped."""
    examples, dropped = [], []
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                try:
                    row = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    raise BadRow("invalid_utf8", "not valid UTF-8") from None
                except json.JSONDecodeError:
                    raise BadRow("invalid_json", "not valid JSON") from None
                if not isinstance(row, dict):
                    raise BadRow("wrong_type", "not a JSON object")
                if source_format == "friction":
                    messages = friction_messages(row, system_prompt)
                else:
                    messages = reluctance_messages(row)
            except BadRow as bad:
                dropped.append({"source": name, "line": line_number, "reason": bad.kind, "detail": str(bad)})
                continue
            row_id = row.get("id")
            examples.append(Example(str(row_id) if row_id is not None else f"{name}:{line_number}", name, messages))
    return examples, dropped


def drop_duplicates(examples: list[Example], dropped: list[dict]) -> list[Example]:
    """Keep the first of examples whose rendered text is identical, within and across sources."""
    seen: dict[str, Example] = {}
    for example in examples:
        key = hashlib.sha256(render(example.messages)[0].encode()).hexdigest()
        if key in seen:
            first = seen[key]
            dropped.append(
                {"source": example.source, "id": example.id, "reason": "duplicate",
                 "detail": f"duplicate of {first.source}:{first.id}"}
            )  # fmt: skip
        else:
            seen[key] = example
    return list(seen.values())


def sample(examples: list[Example], params: Params) -> tuple[Dataset, dict]:
    by_source = {name: [e for e in examples if e.source == name] for name in params.data.sources}
    available = sum(len(rows) for rows in by_source.values())
    asked_total = min(params.mix.target_max, int(params.mix.target_fraction * available))
    parts, report = [], {}
    for name, rows in by_source.items():
        asked = int(asked_total * params.mix.weights[name])
        taken = min(asked, len(rows))
        report[name] = {"available": len(rows), "asked": asked, "sampled": taken, "capped": taken < asked}
        if taken:
            table = Dataset.from_list([{"id": e.id, "source": e.source, "messages": e.messages} for e in rows])
            parts.append(table.shuffle(seed=params.seed).select(range(taken)))
    if not parts:
        raise click.ClickException("mix: no examples sampled; check data.sources and mix.weights in params.yaml")
    mixed = concatenate_datasets(parts).shuffle(seed=params.seed).flatten_indices()
    summary = {"available": available, "asked": asked_total, "sampled": len(mixed)}
    return mixed, {"sources": report, **summary}


def run(params: Params, raw_dir: Path, out_dir: Path, metrics_path: Path) -> None:
    manifest = read_json(raw_dir / "manifest.json")
    examples, dropped = [], []
    rows_in = {}
    for name, source in params.data.sources.items():
        if name not in manifest["sources"]:
            raise click.ClickException(f"{raw_dir}/manifest.json has no source {name!r}; rerun fetch")
        rows_in[name] = manifest["sources"][name]["rows"]
        kept, bad = read_source(raw_dir / f"{name}.jsonl", name, source.format, params.mix.system_prompt)
        examples += kept
        dropped += bad
    examples = drop_duplicates(examples, dropped)
    if dropped and params.mix.on_bad_rows == "fail":
        first = dropped[0]
        where = f"line {first['line']}" if "line" in first else f"id {first['id']}"
        raise click.ClickException(
            f"{raw_dir}/{first['source']}.jsonl {where}: {first['detail']} "
            f"({len(dropped)} bad rows in all; set mix.on_bad_rows: drop to skip them)"
        )

    mixed, report = sample(examples, params)
    split = mixed.train_test_split(test_size=params.mix.validation_fraction, seed=params.seed)

    for name in params.data.sources:
        reasons = Counter(d["reason"] for d in dropped if d["source"] == name)
        kept = sum(1 for e in examples if e.source == name)
        report["sources"][name].update(rows_in=rows_in[name], kept=kept, dropped=dict(sorted(reasons.items())))
        if rows_in[name] != kept + sum(reasons.values()):
            raise AssertionError(f"mix lost rows of {name} without a reason")  # an internal bug, never user input
    weight_sum = sum(params.mix.weights.values())
    report.update(weights_sum=round(weight_sum, 6), train=len(split["train"]), validation=len(split["test"]))

    with atomic_output(out_dir) as scratch:
        scratch.mkdir()
        split["train"].to_json(scratch / "train.jsonl", force_ascii=False)
        split["test"].to_json(scratch / "validation.jsonl", force_ascii=False)
        with (scratch / "dropped.jsonl").open("w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in dropped)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(metrics_path, report)
    for name, counts in report["sources"].items():
        click.echo(
            f"mix: {name}: {counts['rows_in']} rows in, {counts['kept']} kept, {counts['sampled']} sampled"
            + (f" (capped: asked {counts['asked']})" if counts["capped"] else "")
        )
    click.echo(f"mix: {report['train']} train / {report['validation']} validation examples")
