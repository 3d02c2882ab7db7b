"""Training backends on CPU: which one `train.backend` resolves to, the errors that say how to fix a wrong choice,
and that unsloth's adapter is built from the same LoRA settings as the hf one (with a stand-in for unsloth)."""

from __future__ import annotations

import importlib.machinery
import json
import subprocess
import sys
import types
from pathlib import Path
from typing import ClassVar

import click
import pytest
import torch
from conftest import REPO
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from friction import modeling
from friction.config import Params
from friction.training import checkpointing_argument, sft_config


@pytest.fixture
def cuda(monkeypatch):
    """Pretend a CUDA GPU is (True) or is not (False) visible."""

    def set_visible(visible: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: visible)

    return set_visible


@pytest.fixture
def unsloth_absent(monkeypatch):
    monkeypatch.setitem(sys.modules, "unsloth", None)  # `import unsloth` now fails as if it were not installed


def install_fake_unsloth(monkeypatch, fast_language_model: type | None = None) -> types.ModuleType:
    fake = types.ModuleType("unsloth")
    fake.__spec__ = importlib.machinery.ModuleSpec("unsloth", None)
    fake.FastLanguageModel = fast_language_model
    monkeypatch.setitem(sys.modules, "unsloth", fake)
    return fake


def test_auto_is_hf_without_a_gpu(cuda):
    cuda(False)
    assert modeling.resolve_backend("auto") == "hf"


def test_hf_is_hf_even_with_a_gpu_and_unsloth(cuda, monkeypatch):
    cuda(True)
    install_fake_unsloth(monkeypatch)
    assert modeling.resolve_backend("hf") == "hf"


def test_auto_is_unsloth_with_a_gpu_and_unsloth(cuda, monkeypatch):
    cuda(True)
    install_fake_unsloth(monkeypatch)
    assert modeling.resolve_backend("auto") == "unsloth"


def test_auto_falls_back_to_hf_when_unsloth_is_missing(cuda, unsloth_absent, capsys):
    cuda(True)
    assert modeling.resolve_backend("auto") == "hf"
    assert "unsloth is not installed" in capsys.readouterr().out


def test_unsloth_without_a_gpu_says_what_to_set(cuda, monkeypatch):
    cuda(False)
    install_fake_unsloth(monkeypatch)
    with pytest.raises(click.ClickException) as caught:
        modeling.resolve_backend("unsloth")
    assert "train.backend: unsloth needs a CUDA GPU" in caught.value.message
    assert "train.backend: hf" in caught.value.message


def test_unsloth_not_installed_says_how_to_install(cuda, unsloth_absent):
    cuda(True)
    with pytest.raises(click.ClickException) as caught:
        modeling.resolve_backend("unsloth")
    message = caught.value.message
    assert "train.backend: unsloth" in message and "not installed" in message and "make unsloth" in message


def test_unsloth_that_fails_to_import_says_why(cuda, monkeypatch, tmp_path: Path):
    cuda(True)
    package = tmp_path / "unsloth"
    package.mkdir()
    (package / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    monkeypatch.delitem(sys.modules, "unsloth", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(click.ClickException) as caught:
        modeling.resolve_backend("unsloth")
    assert "RuntimeError: operator torchvision::nms does not exist" in caught.value.message
    assert modeling.resolve_backend("auto") == "hf"


class FakeFastLanguageModel:
    """Stands in for unsloth's FastLanguageModel: the tiny model through transformers, and LoRA through peft built
    the way unsloth 2026.10.9 builds it (its LoRA keywords, then the rest passed on to LoraConfig)."""

    calls: ClassVar[dict[str, dict]] = {}

    @classmethod
    def from_pretrained(
        cls,
        model_name,
        max_seq_length=2048,
        dtype=None,
        load_in_4bit=True,
        revision=None,
        use_exact_model_name=False,
        fix_tokenizer=True,
    ):
        cls.calls["from_pretrained"] = {
            "model_name": model_name,
            "max_seq_length": max_seq_length,
            "dtype": dtype,
            "load_in_4bit": load_in_4bit,
            "revision": revision,
            "use_exact_model_name": use_exact_model_name,
            "fix_tokenizer": fix_tokenizer,
        }
        return AutoModelForCausalLM.from_pretrained(model_name, dtype=dtype), AutoTokenizer.from_pretrained(model_name)

    @classmethod
    def get_peft_model(
        cls,
        model,
        r=16,
        target_modules=(),
        lora_alpha=16,
        lora_dropout=0.0,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=3407,
        **kwargs,
    ):
        cls.calls["get_peft_model"] = {
            "use_gradient_checkpointing": use_gradient_checkpointing,
            "random_state": random_state,
        }
        torch.manual_seed(random_state)
        config = LoraConfig(
            r=r,
            lora_alpha=lora_alpha,
            target_modules=target_modules,
            lora_dropout=lora_dropout,
            bias=bias,
            task_type="CAUSAL_LM",
            **kwargs,
        )
        return get_peft_model(model, config)


@pytest.fixture
def tiny_manifest(tmp_path: Path, tiny_model_dir: Path) -> Path:
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"base_model": {"location": str(tiny_model_dir), "resolved_revision": None}}))
    return manifest


def with_train(params: Params, **train) -> Params:
    raw = params.model_dump()
    raw["train"].update(train)
    return Params.model_validate(raw)


def test_both_backends_build_the_same_adapter(
    demo_params: Params, tiny_manifest: Path, tiny_model_dir: Path, monkeypatch
):
    install_fake_unsloth(monkeypatch, FakeFastLanguageModel)
    params = with_train(demo_params, gradient_checkpointing=True)

    hf_model, _ = modeling.hf_model_with_adapter(params, tiny_manifest)
    unsloth_model, _ = modeling.unsloth_model_with_adapter(params, tiny_manifest)

    hf_config, unsloth_config = hf_model.peft_config["default"], unsloth_model.peft_config["default"]
    assert unsloth_config.to_dict() == hf_config.to_dict()
    assert (hf_config.r, hf_config.lora_alpha, hf_config.lora_dropout) == (8, 16, 0.0)
    assert set(hf_config.target_modules) == set(params.lora.target_modules)
    assert FakeFastLanguageModel.calls["from_pretrained"] == {
        "model_name": str(tiny_model_dir),
        "max_seq_length": params.model.max_length,
        "dtype": torch.float32,
        "load_in_4bit": False,
        "revision": None,
        "use_exact_model_name": True,
        "fix_tokenizer": False,
    }
    assert FakeFastLanguageModel.calls["get_peft_model"] == {
        "use_gradient_checkpointing": "unsloth",
        "random_state": params.seed,
    }
    without_checkpointing = modeling.unsloth_peft_arguments(with_train(params, gradient_checkpointing=False), None)
    assert without_checkpointing["use_gradient_checkpointing"] is False


def test_lora_settings_come_from_params_for_both_backends(demo_params: Params):
    shared = modeling.lora_hyperparameters(demo_params, "abc123")
    unsloth_only = set(modeling.unsloth_peft_arguments(demo_params, "abc123")) - set(shared)
    assert unsloth_only == {"random_state", "use_gradient_checkpointing"}
    hf = modeling.hf_lora_config(demo_params, "abc123")
    assert {key: getattr(hf, key) for key in shared} == {**shared, "target_modules": set(shared["target_modules"])}


def test_the_trainer_checkpoints_activations_only_for_hf(demo_params: Params, tmp_path: Path):
    params = with_train(demo_params, gradient_checkpointing=True)
    (name,) = checkpointing_argument(True)
    for backend, expected in (("hf", True), ("unsloth", False)):  # unsloth has set up its own
        assert getattr(sft_config(params, backend, tmp_path), name) is expected, backend


def test_library_versions_name_unsloth_only_when_it_trains(monkeypatch):
    monkeypatch.setattr(modeling, "version", lambda name: f"{name}-1.0")
    assert "unsloth" not in modeling.library_versions("hf")
    versions = modeling.library_versions("unsloth")
    assert versions["unsloth"] == "unsloth-1.0" and versions["unsloth_zoo"] == "unsloth_zoo-1.0"


def test_the_backend_is_chosen_before_anything_imports_transformers():
    """unsloth patches transformers, trl and peft as it is imported: `python -m stages train` must import it before them."""
    libraries = ("transformers", "trl", "peft")
    code = f"import sys, friction.cli, friction.modeling; print([m for m in {libraries} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_auto_with_several_gpus_is_hf_and_says_why_even_where_unsloth_imports(cuda, monkeypatch, capsys):
    cuda(True)
    install_fake_unsloth(monkeypatch)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert modeling.resolve_backend("auto", processes=4) == "hf"
    assert "auto uses hf: unsloth trains in one process, and train.gpus is 4 (data parallel)" in capsys.readouterr().out
    assert modeling.resolve_backend("auto", processes=1) == "unsloth"  # one GPU: unsloth as before


def test_auto_under_fsdp_is_hf(cuda, monkeypatch, capsys):
    cuda(True)
    install_fake_unsloth(monkeypatch)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert modeling.resolve_backend("auto") == "hf"
    assert "the launcher asks for FSDP" in capsys.readouterr().out


def test_unsloth_asked_for_several_gpus_is_refused_before_it_is_imported(cuda, unsloth_absent, monkeypatch):
    cuda(True)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    with pytest.raises(click.ClickException, match="unsloth trains in one process, but train.gpus is 2.*train.gpus: 1"):
        modeling.resolve_backend("unsloth", processes=2)
