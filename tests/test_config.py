"""Tests of friction.config: the shipped recipes validate, and every kind of mistake names the file and the key."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from conftest import REPO

from friction.config import Params, load_params

RECIPES = [REPO / "params.yaml", *sorted((REPO / "recipes").glob("*.yaml"))]
DEMO = (REPO / "recipes/demo.yaml").read_text(encoding="utf-8")


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: path.name)
def test_shipped_recipes_validate(path: Path) -> None:
    params = load_params(path)
    assert isinstance(params, Params)
    assert set(params.mix.weights) == set(params.data.sources)


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda path: path.stem)
def test_each_recipe_says_where_its_numbers_come_from_and_names_itself(path: Path) -> None:
    assert path.read_text(encoding="utf-8").startswith("# "), f"{path.name} must open with a provenance comment"
    assert load_params(path).recipe == path.stem


def test_committed_params_are_the_card_recipe() -> None:
    assert (REPO / "params.yaml").read_bytes() == (REPO / "recipes/card.yaml").read_bytes()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def edit(old: str, new: str) -> str:
    """The demo recipe with one exact, unique piece of text replaced."""
    assert DEMO.count(old) == 1, old
    return DEMO.replace(old, new)


def error_of(path: Path) -> str:
    with pytest.raises(click.ClickException) as caught:
        load_params(path)
    return caught.value.message


# (what is wrong, the text edit, the dotted key the message must name)
MISTAKES = [
    ("unknown key", ("  batch_size: 2\n", "  batch_size: 2\n  batchsize: 4\n"), "train.batchsize"),
    ("unknown section", ("seed: 42\n", "seed: 42\nsed: 42\n"), "sed"),
    (
        "unknown source key",
        (
            "disagreement.jsonl\n      format: friction\n",
            "disagreement.jsonl\n      format: friction\n      split: train\n",
        ),
        "data.sources.disagreement.split",
    ),
    ("wrong type int", ("  rank: 8\n", "  rank: eight\n"), "lora.rank"),
    ("wrong type fractional int", ("  rank: 8\n", "  rank: 8.5\n"), "lora.rank"),
    (
        "wrong type bool",
        ("  gradient_checkpointing: false\n", "  gradient_checkpointing: maybe\n"),
        "train.gradient_checkpointing",
    ),
    ("wrong type list", ("  tags: [ai-friction, demo]\n", "  tags: demo\n"), "card.tags"),
    ("wrong type section", ("pack:\n  strategy: bfd\n  overflow: truncate\n", "pack: bfd\n"), "pack"),
    ("not a choice", ("  strategy: bfd\n", "  strategy: greedy\n"), "pack.strategy"),
    ("not a choice", ("  on_bad_rows: drop\n", "  on_bad_rows: ignore\n"), "mix.on_bad_rows"),
    (
        "not a choice",
        ("disagreement.jsonl\n      format: friction\n", "disagreement.jsonl\n      format: sharegpt\n"),
        "data.sources.disagreement.format",
    ),
    ("out of range", ("  validation_fraction: 0.1\n", "  validation_fraction: 1.0\n"), "mix.validation_fraction"),
    ("out of range", ("  target_fraction: 0.9\n", "  target_fraction: 0\n"), "mix.target_fraction"),
    ("out of range", ("  dropout: 0.0\n", "  dropout: 1.5\n"), "lora.dropout"),
    ("out of range", ("seed: 42\n", "seed: -1\n"), "seed"),
    ("out of range", ("  max_length: 1024\n", "  max_length: 8\n"), "model.max_length"),
    ("out of range", ("  learning_rate: 2.0e-3\n", "  learning_rate: -1e-07\n"), "train.learning_rate"),
    ("negative weight", ("    disagreement: 0.2\n", "    disagreement: -0.2\n"), "mix.weights.disagreement"),
    ("missing key", ("  epochs: 3\n", ""), "train.epochs"),
    (
        "missing format",
        (
            "      path: data/sources/demo/overthinking.jsonl\n      format: friction\n",
            "      path: data/sources/demo/overthinking.jsonl\n",
        ),
        "data.sources.overthinking.format",
    ),
]


@pytest.mark.parametrize(("what", "change", "key"), MISTAKES, ids=[m[0] + ":" + m[2] for m in MISTAKES])
def test_mistake_names_file_and_key(tmp_path: Path, what: str, change: tuple[str, str], key: str) -> None:
    path = write(tmp_path, edit(*change))
    message = error_of(path)
    assert str(path) in message
    # The key starts a line of the report: "  lora.rank: Input should be ..."
    assert re.search(rf"^\s*{re.escape(key)}: ", message, re.M), message


def test_weights_naming_an_unknown_source(tmp_path: Path) -> None:
    text = edit("    disagreement: 0.2\n", "    disagreement: 0.2\n    uncertainty: 0.1\n")
    message = error_of(write(tmp_path, text))
    assert "params.yaml" in message
    assert re.search(r"mix\.weights\b.*\buncertainty\b", message), message


def test_weights_missing_a_source(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, edit("    overthinking: 0.2\n", "")))
    assert "params.yaml" in message
    assert re.search(r"mix\.weights\b.*\boverthinking\b", message), message


@pytest.mark.parametrize(
    "path",
    [
        "data/raw/disagreement.jsonl",  # inside the workspace but not tracked as fetch's dependency
        "/tmp/disagreement.jsonl",
        "data/sources/../raw/disagreement.jsonl",  # lexically under data/sources, really outside it
        "data/sources/demo/../../../elsewhere.jsonl",
    ],
)
def test_local_source_outside_data_sources(tmp_path: Path, path: str) -> None:
    message = error_of(write(tmp_path, edit("path: data/sources/demo/disagreement.jsonl", f"path: {path}")))
    assert "params.yaml" in message
    assert re.search(r"^\s*data\.sources\.disagreement: .*data/sources", message, re.M), message


def test_local_source_in_a_subfolder_of_data_sources_is_fine(tmp_path: Path) -> None:
    text = edit("path: data/sources/demo/disagreement.jsonl", "path: data/sources/demo/./more/../disagreement.jsonl")
    assert load_params(write(tmp_path, text)).data.sources["disagreement"].format == "friction"


def test_hub_and_path_both_given(tmp_path: Path) -> None:
    text = edit(
        "      path: data/sources/demo/disagreement.jsonl\n",
        "      path: data/sources/demo/disagreement.jsonl\n      hub: leonvanbokhorst/friction-disagreement-v2\n",
    )
    message = error_of(write(tmp_path, text))
    assert "params.yaml" in message
    assert re.search(r"^\s*data\.sources\.disagreement: .*'hub'.*'path'", message, re.M), message


def test_neither_hub_nor_path_given(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, edit("      path: data/sources/demo/reluctance_v53.jsonl\n", "")))
    assert re.search(r"^\s*data\.sources\.reluctance_v53: .*'hub'.*'path'", message, re.M), message


def test_every_mistake_is_reported_at_once(tmp_path: Path) -> None:
    text = edit("  rank: 8\n", "  rank: 0\n").replace("  max_new_tokens: 48\n", "  max_new_tokens: none\n")
    message = error_of(write(tmp_path, text))
    assert "lora.rank" in message and "evaluate.max_new_tokens" in message


def test_an_enabled_judge_needs_a_model(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, edit("  enabled: false\n", "  enabled: true\n")))
    assert "judge.enabled needs judge.model" in message, message


def test_dvc_exp_run_float_notation_loads_as_float(tmp_path: Path) -> None:
    # `dvc exp run -S train.learning_rate=1e-7` writes 1e-07, which YAML 1.1 loaders (PyYAML) read as a string.
    text = edit("  learning_rate: 2.0e-3\n", "  learning_rate: 1e-07\n").replace(
        "  early_stopping_threshold: 0.005\n", "  early_stopping_threshold: 5e-03\n"
    )
    params = load_params(write(tmp_path, text))
    assert type(params.train.learning_rate) is float and params.train.learning_rate == 1e-7
    assert type(params.train.early_stopping_threshold) is float and params.train.early_stopping_threshold == 0.005


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = write(tmp_path, "seed: [42\n")
    assert "not valid YAML" in error_of(bad) and str(bad) in error_of(bad)
    missing = tmp_path / "nope.yaml"
    assert str(missing) in error_of(missing) and "not found" in error_of(missing)


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert str(path) in error_of(path)


def test_params_are_frozen(demo_params: Params) -> None:
    with pytest.raises(Exception):
        demo_params.seed = 1  # type: ignore[misc]
