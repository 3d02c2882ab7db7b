"""A new user's mistakes (tests/fixtures/bad_inputs/): each stops its stage with exit code 1 and a message naming the
file or key, never a traceback, and loses no earlier output or checkpoint. Rows that cannot be trained on are
dropped and counted instead."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import REPO
from peft import LoraConfig, get_peft_model
from ruamel.yaml import YAML
from transformers import AutoModelForCausalLM

from stages.cli import main
from stages.pipeline import stage_argv

CORPUS = REPO / "tests/fixtures/bad_inputs"
PARAMS_CASES = YAML(typ="safe").load(CORPUS / "params.yaml")


def stage_args(stage: str) -> list[str]:
    """`friction <stage>`'s arguments as dvc.yaml's cmd line gives them."""
    return stage_argv(stage, REPO / "dvc.yaml")[1:]


KEPT = ("data", "models", "metrics")  # what earlier runs left, which no failed stage may lose


@pytest.fixture(scope="module")
def finished(demo_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace as a user has it after a run: fetched, mixed and packed data, an adapter, resumable checkpoints."""
    root = tmp_path_factory.mktemp("bad-inputs") / "finished"
    shutil.copytree(demo_pipeline, root, symlinks=True)
    shutil.copytree(REPO / "data/eval", root / "data/eval")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(root / "data/sources/demo-base")
    adapter = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    adapter.save_pretrained(str(root / "models/adapter"))
    checkpoint = root / "models/checkpoints/checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    (root / "models/checkpoints/fingerprint.txt").write_text("the fingerprint of the run that wrote them")
    return root


@pytest.fixture
def workspace(finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    copy = tmp_path / "workspace"
    shutil.copytree(finished, copy, symlinks=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return copy


def snapshot(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for top in KEPT
        for path in sorted((root / top).rglob("*"))
        if path.is_file() and "sources" not in path.parts
    }


def fails_cleanly(root: Path, stage: str, message: str) -> None:
    """Run `friction <stage>`: exit 1, `message` in its error, and every earlier output as it was."""
    before = snapshot(root)
    result = CliRunner().invoke(main, stage_args(stage))
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), f"a traceback, not a message: {result.exception!r}"
    assert message in result.output, result.output
    assert snapshot(root) == before, "a failed stage changed or lost an earlier output"
    assert not list(root.glob("**/.*.partial")), "a failed stage left a scratch output behind"


def change_params(root: Path, changes: dict[str, object]) -> None:
    yaml = YAML()
    params = yaml.load(root / "params.yaml")
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        node = params
        for parent in parents:
            node = node[parent]
        node[key] = value
    yaml.dump(params, root / "params.yaml")


@pytest.mark.parametrize("case", sorted(PARAMS_CASES))
def test_params_mistakes(workspace: Path, case: str) -> None:
    spec = PARAMS_CASES[case]
    change_params(workspace, spec["change"])
    fails_cleanly(workspace, spec["stage"], spec["message"])


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x04  # inside a data page, where no reader's format check would notice
    path.write_bytes(bytes(data))


def drop_base_model(path: Path) -> None:
    manifest = json.loads(path.read_text())
    del manifest["base_model"]
    path.write_text(json.dumps(manifest))


DAMAGED_FILES: dict[str, tuple[str, Callable[[Path], None], str, str]] = {
    # case: (file, damage, stage, message)
    "truncated_mixed_parquet": ("data/mixed/train.parquet", truncate, "pack", "train.parquet: not a readable Parquet"),
    "bit_flipped_mixed_parquet": ("data/mixed/train.parquet", flip_a_bit, "pack", "train.parquet: not a readable"),
    "truncated_packed_parquet": ("data/packed/validation.parquet", truncate, "train", "validation.parquet: not a"),
    "bit_flipped_packed_parquet": ("data/packed/validation.parquet", flip_a_bit, "evaluate", "CRC checksum"),
    "missing_adapter_weights": ("models/adapter/adapter_model.safetensors", Path.unlink, "evaluate",
                                "adapter_model.safetensors: missing; run train"),
    "truncated_adapter_weights": ("models/adapter/adapter_model.safetensors", truncate, "evaluate",
                                  "models/adapter: a damaged adapter"),
    "base_without_config": ("data/sources/demo-base/config.json", Path.unlink, "train",
                            "data/sources/demo-base: cannot read the base model's config"),
    "base_without_config_in_evaluate": ("data/sources/demo-base/config.json", Path.unlink, "evaluate",
                                        "data/sources/demo-base: cannot load the base model"),
    "base_without_tokenizer_json": ("data/sources/demo-base/tokenizer.json", Path.unlink, "mix",
                                    "the base model's tokenizer does not reproduce the text"),
    "missing_prompts": ("data/eval/prompts.jsonl", Path.unlink, "evaluate", "prompts.jsonl: missing; held-out"),
    "manifest_without_base_model": ("data/raw/manifest.json", drop_base_model, "mix",
                                    "data/raw/manifest.json: no base_model"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(DAMAGED_FILES))
def test_damaged_files(workspace: Path, case: str) -> None:
    relative, damage, stage, message = DAMAGED_FILES[case]
    target = workspace / relative
    if "demo-base" in relative:  # a real folder, not the shared fixture the workspace links to
        base = workspace / "data/sources/demo-base"
        shutil.copytree(base.resolve(), base.with_name("base-copy"))
        base.unlink() if base.is_symlink() else shutil.rmtree(base)
        base.with_name("base-copy").rename(base)
    damage(target)
    fails_cleanly(workspace, stage, message)


def test_dirty_rows_are_dropped_and_counted_with_their_lines(workspace: Path) -> None:
    shutil.copyfile(CORPUS / "dirty_rows.jsonl", workspace / "data/sources/demo/disagreement.jsonl")
    for stage in ("fetch", "mix"):
        result = CliRunner().invoke(main, stage_args(stage))
        assert result.exit_code == 0, result.output
    dropped = [json.loads(line) for line in (workspace / "data/mixed/dropped.jsonl").read_text().splitlines()]
    from_file = sorted((d["line"], d["reason"], d["detail"]) for d in dropped if d["source"] == "disagreement")
    assert from_file == [
        (3, "duplicate", "duplicate of disagreement line 1 (id bom-1)"),  # line 1 begins with a byte-order mark
        (4, "invalid_json", "not valid JSON"),
        (5, "generator_error", "generator error in 'final_answer'"),
    ]
    report = json.loads((workspace / "metrics/mix.json").read_text())["sources"]["disagreement"]
    assert (report["rows_in"], report["kept"]) == (6, 3)


@pytest.mark.needs_triton  # trains with TRL
def test_a_nan_loss_stops_training_and_keeps_no_adapter(workspace: Path) -> None:
    change_params(workspace, {"train.learning_rate": 1.0e30, "train.max_steps": 4, "train.logging_steps": 1})
    adapter = snapshot(workspace)
    result = CliRunner().invoke(main, stage_args("train"))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "no adapter is saved" in result.output, result.output
    assert any(f"is {value}" in result.output for value in ("nan", "inf", "-inf")), result.output
    after = snapshot(workspace)
    # The adapter of the earlier, good run is still the one there: nothing of the NaN run replaced it.
    assert {k: v for k, v in after.items() if k.startswith("models/adapter")} == {
        k: v for k, v in adapter.items() if k.startswith("models/adapter")
    }
    assert not (workspace / "metrics/train.json").exists()
