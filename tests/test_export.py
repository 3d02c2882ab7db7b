"""export: the GGUF LoRA read back with gguf's reader, its deltas against peft's merge, the refusals, the vLLM rank,
and the Modelfile's template against the training ids in the base's vocabulary (the recipe's real ids and the demo's).

llama.cpp itself loading the export, and `transformers serve`, are tests/test_engines.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import click
import gguf
import numpy as np
import pytest
import torch
from conftest import REPO
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from friction import gguf_export
from friction.pipeline import stage_argv
from friction.tokens import end_of_turn_id, load_tokenizer

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GGUF_NAMES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
# Largest |GGUF delta - peft delta| allowed, relative to the largest |peft delta|, per tensor type: the rounding of
# the type (f16: 2^-11, bf16: 2^-8, q8_0: 1/254 of a block's largest value), with room for B·A's sums.
TOLERANCE = {"f32": 1e-6, "f16": 2e-3, "bf16": 1.6e-2, "q8_0": 2e-2}


def field_value(reader: gguf.GGUFReader, key: str):
    field = reader.fields[key]
    value = field.parts[field.data[0]]
    return bytes(value).decode("utf-8") if field.types[0] == gguf.GGUFValueType.STRING else value[0]


def read_lora(path: Path) -> tuple[gguf.GGUFReader, dict[str, np.ndarray]]:
    """The file's reader and every tensor dequantized to float32, in numpy's (rows, columns) order."""
    reader = gguf.GGUFReader(path)
    tensors = {}
    for tensor in reader.tensors:
        rows_columns = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        tensors[tensor.name] = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(rows_columns)
    return reader, tensors


def gguf_deltas(path: Path) -> dict[str, np.ndarray]:
    """alpha / r x B·A per weight, as llama.cpp applies the file (r from each lora_a's rows)."""
    reader, tensors = read_lora(path)
    alpha = float(field_value(reader, "adapter.lora.alpha"))
    deltas = {}
    for name in tensors:
        if name.endswith(".lora_a"):
            weight = name.removesuffix(".lora_a")
            lora_a, lora_b = tensors[name], tensors[weight + ".lora_b"]
            deltas[weight] = alpha / lora_a.shape[0] * (lora_b.astype(np.float64) @ lora_a.astype(np.float64))
    return deltas


def peft_merge_deltas(base_dir: Path, adapter_dir: Path) -> dict[str, np.ndarray]:
    """What peft's merge_and_unload adds to each weight, by GGUF weight name."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    before = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    deltas = {}
    for name, tensor in merged.state_dict().items():
        if name in before and not torch.equal(tensor, before[name]):
            layer, module = name.split(".")[2], name.split(".")[-2]
            deltas[f"blk.{layer}.{GGUF_NAMES[module]}.weight"] = (tensor - before[name]).double().numpy()
    return deltas


def assert_deltas_match(gguf_path: Path, expected: dict[str, np.ndarray], tolerance: float) -> None:
    got = gguf_deltas(gguf_path)
    assert set(got) == set(expected)
    for name, delta in expected.items():
        error = np.abs(got[name] - delta).max() / np.abs(delta).max()
        assert error <= tolerance, f"{name}: relative error {error:.2e} > {tolerance}"


# ------------------------------------------------------------------------------------- the demo's exported adapter


def test_export_writes_the_gguf_the_modelfile_and_the_readme(exported_demo):
    workspace, output = exported_demo
    out = workspace / "models/friction-gguf"
    assert sorted(path.name for path in out.iterdir()) == [
        "Modelfile",
        "README.md",
        "chat_template.jinja",
        "friction-lora-f16.gguf",
    ]
    modelfile = (out / "Modelfile").read_text(encoding="utf-8")
    assert "FROM ./demo-base.gguf\nADAPTER ./friction-lora-f16.gguf\n" in modelfile
    assert 'SYSTEM """You are a human-like AI assistant."""' in modelfile
    assert "PARAMETER stop" not in modelfile  # <|im_end|> was the EOS id in training: the EOS id stops every engine
    assert "<｜end▁of▁sentence｜>" in modelfile and "<|im_end|>" not in modelfile
    readme = (out / "README.md").read_text(encoding="utf-8")
    vllm = (
        "vllm serve data/sources/demo-base --enable-lora --lora-modules friction=models/friction-adapter "
        "--max-lora-rank 8 --tokenizer models/friction-adapter"
    )
    assert vllm in readme and "transformers serve merged/" in readme
    assert "vLLM --max-lora-rank 8" in output and "Modelfile template gives the training ids" in output


def test_gguf_reads_back_with_its_keys_names_shapes_and_types(exported_demo):
    workspace, _ = exported_demo
    reader, _ = read_lora(workspace / "models/friction-gguf/friction-lora-f16.gguf")
    assert field_value(reader, "general.architecture") == "qwen2"
    assert field_value(reader, "general.type") == "adapter"
    assert field_value(reader, "adapter.type") == "lora"
    assert field_value(reader, "adapter.lora.alpha") == 16.0
    config = json.loads((workspace / "data/sources/demo-base/config.json").read_text())
    hidden, inner, kv = config["hidden_size"], config["intermediate_size"], config["num_key_value_heads"]
    kv_width = kv * hidden // config["num_attention_heads"]
    in_out = {
        "attn_q": (hidden, hidden),
        "attn_k": (hidden, kv_width),
        "attn_v": (hidden, kv_width),
        "attn_output": (hidden, hidden),
        "ffn_gate": (hidden, inner),
        "ffn_up": (hidden, inner),
        "ffn_down": (inner, hidden),
    }
    expected = {}
    for layer in range(config["num_hidden_layers"]):
        for name, (fan_in, fan_out) in in_out.items():
            expected[f"blk.{layer}.{name}.weight.lora_a"] = [fan_in, 8]  # GGUF's order: columns first (r x in)
            expected[f"blk.{layer}.{name}.weight.lora_b"] = [8, fan_out]  # out x r
    assert {t.name: t.shape.tolist() for t in reader.tensors} == expected
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F16}


def test_gguf_scale_times_b_a_is_peft_merge_delta_for_the_demo_adapter(exported_demo):
    workspace, _ = exported_demo
    expected = peft_merge_deltas(workspace / "data/sources/demo-base", workspace / "models/friction-adapter")
    assert len(expected) == 14 and all(np.abs(delta).max() > 0 for delta in expected.values())  # trained: B is not 0
    assert_deltas_match(workspace / "models/friction-gguf/friction-lora-f16.gguf", expected, TOLERANCE["f16"])


# ---------------------------------------------------------------------------------- hand-made adapters, known numbers


def handmade_adapter(base_dir: Path, out: Path, **config) -> Path:
    """An adapter on the tiny base whose A and B hold known numbers: A[i, j] = (i + 1) / 8 * sin(j), B[i, j] =
    cos(i + j) / (j + 1)."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(lora_dropout=0.0, **config))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                rows, columns = np.indices(parameter.shape)
                if ".lora_A." in name:
                    parameter.copy_(torch.from_numpy((rows + 1) / 8 * np.sin(columns)))
                else:
                    parameter.copy_(torch.from_numpy(np.cos(rows + columns) / (columns + 1)))
    model.save_pretrained(str(out))
    return out


def known_delta(rank: int, fan_in: int, fan_out: int, scale: float) -> np.ndarray:
    rows, columns = np.indices((rank, fan_in))
    lora_a = (rows + 1) / 8 * np.sin(columns)
    rows, columns = np.indices((fan_out, rank))
    lora_b = np.cos(rows + columns) / (columns + 1)
    return scale * lora_b @ lora_a


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "bf16", "q8_0"])
def test_handmade_adapter_gives_its_known_deltas_in_every_type(tiny_model_dir, tmp_path, gguf_type):
    # rsLoRA at rank 2 on q_proj, a rank_pattern and alpha_pattern on down_proj: two scales llama.cpp's one
    # alpha / r cannot say alone.
    folder = handmade_adapter(
        tiny_model_dir,
        tmp_path / "adapter",
        r=2,
        lora_alpha=6,
        use_rslora=True,
        target_modules=["q_proj", "down_proj"],
        rank_pattern={"down_proj": 4},
        alpha_pattern={"down_proj": 3},
    )
    adapter = gguf_export.read_adapter(folder)
    out = tmp_path / f"lora-{gguf_type}.gguf"
    written = gguf_export.write_gguf_lora(adapter, "qwen2", gguf_type, out, "handmade")
    assert written["alpha"] == 6  # ranks differ: the rsLoRA factor is folded per module, not into alpha
    assert set(written["folded_scales"]) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    assert all(math.isclose(ratio, math.sqrt(2)) for ratio in written["folded_scales"].values())

    hidden, inner = 128, 256
    known = {}
    for layer in (0, 1):
        known[f"blk.{layer}.attn_q.weight"] = known_delta(2, hidden, hidden, 6 / math.sqrt(2))  # rsLoRA: alpha/sqrt(r)
        # rsLoRA applies to every module: alpha_pattern's 3 over the square root of rank_pattern's 4
        known[f"blk.{layer}.ffn_down.weight"] = known_delta(4, inner, hidden, 3 / 2)
    peft_deltas = peft_merge_deltas(tiny_model_dir, folder)
    for name, delta in known.items():
        np.testing.assert_allclose(peft_deltas[name], delta, rtol=0, atol=1e-5 * np.abs(delta).max())
    assert_deltas_match(out, known, TOLERANCE[gguf_type])
    reader, _ = read_lora(out)
    types = {tensor.name: tensor.tensor_type for tensor in reader.tensors}
    expected_type = gguf.GGMLQuantizationType[gguf_type.upper()]
    assert types["blk.0.ffn_down.weight.lora_a"] == expected_type
    # q8_0 quantizes rows in blocks of 32: lora_b's rows are r (2 or 4) long and stay f16.
    f16 = gguf.GGMLQuantizationType.F16
    assert types["blk.0.ffn_down.weight.lora_b"] == (f16 if gguf_type == "q8_0" else expected_type)


def test_rslora_at_one_rank_converts_the_alpha(tiny_model_dir, tmp_path):
    folder = handmade_adapter(
        tiny_model_dir, tmp_path / "adapter", r=4, lora_alpha=8, use_rslora=True, target_modules=["v_proj"]
    )
    written = gguf_export.write_gguf_lora(gguf_export.read_adapter(folder), "qwen2", "f32", tmp_path / "a.gguf", "x")
    assert written["alpha"] == pytest.approx(8 * 2) and not written["folded_scales"]  # 16 / 4 = 8 / sqrt(4)
    kv_width = 64
    known = {f"blk.{layer}.attn_v.weight": known_delta(4, 128, kv_width, 8 / 2) for layer in (0, 1)}
    assert_deltas_match(tmp_path / "a.gguf", known, TOLERANCE["f32"])


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"target_modules": ["q_proj"], "use_dora": True}, "DoRA"),
        ({"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"target_modules": ["embed_tokens", "q_proj"]}, "embedding or lm_head"),
        ({"target_modules": ["lm_head"]}, "embedding or lm_head"),
        ({"target_modules": ["q_proj"], "bias": "lora_only"}, "bias"),
    ],
)
def test_adapters_the_engines_cannot_load_are_refused_with_the_reason(tiny_model_dir, tmp_path, config, reason):
    folder = handmade_adapter(tiny_model_dir, tmp_path / "adapter", r=2, lora_alpha=4, **config)
    refusals = gguf_export.engine_refusals(gguf_export.read_adapter(folder))
    assert any(reason in refusal for refusal in refusals), refusals
    with pytest.raises(click.ClickException, match=reason):
        gguf_export.write_gguf_lora(gguf_export.read_adapter(folder), "qwen2", "f16", tmp_path / "x.gguf", "x")
    assert not (tmp_path / "x.gguf").exists()


def test_the_stage_refuses_a_dora_adapter_saying_why_and_writes_nothing(exported_demo, tmp_path):
    workspace, _ = exported_demo
    folder = handmade_adapter(
        workspace / "data/sources/demo-base",
        tmp_path / "dora",
        r=2,
        lora_alpha=4,
        target_modules=["q_proj"],
        use_dora=True,
    )
    out = tmp_path / "gguf"
    argv = stage_argv("export", REPO / "dvc.yaml", adapter=folder, out=out)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{REPO / '.venv/bin'}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(argv, cwd=workspace, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 1 and "use_dora: DoRA" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(("rank", "flag"), [(1, 1), (8, 8), (12, 16), (64, 64), (100, 128), (300, 320), (512, 512)])
def test_vllm_rank_is_rounded_up_to_what_vllm_accepts(rank, flag):
    adapter = gguf_export.Adapter(Path("a"), {"lora_alpha": 16}, lora_a={"m": np.zeros((rank, 4))})
    assert gguf_export.vllm_rank(adapter) == flag
    flags = [name for name, _ in gguf_export.vllm_flags(adapter) if name.startswith("--max-lora-rank")]
    assert flags == [f"--max-lora-rank {flag}"]


def test_vllm_rank_above_its_largest_is_refused():
    adapter = gguf_export.Adapter(Path("a"), {"lora_alpha": 16}, lora_a={"m": np.zeros((600, 4))})
    with pytest.raises(click.ClickException, match="above vLLM's largest"):
        gguf_export.vllm_rank(adapter)


# ------------------------------------------------------------------------------- the Modelfile's template and ids


def test_go_template_renders_each_turn_and_opens_the_reply():
    template = gguf_export.ollama_template("<E>")
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    rendered = gguf_export.render_go_template(template, messages)
    assert rendered == "<|im_start|>system\nS\n<E>\n<|im_start|>user\nU\n<E>\n<|im_start|>assistant\n<think>\n"
    with pytest.raises(ValueError, match="not supported"):
        gguf_export.render_go_template("{{ if .System }}x{{ end }}", messages)


@pytest.mark.parametrize("vocabulary", ["real_base_dir", "tiny_model_dir"])
def test_template_gives_the_training_ids_in_the_base_vocabulary(request, vocabulary):
    base_dir = request.getfixturevalue(vocabulary)
    base_tokenizer = AutoTokenizer.from_pretrained(base_dir)  # the base's own vocabulary: what GGUF engines use
    training = load_tokenizer(base_dir, None)  # as mix tokenized the data
    end_text = gguf_export.end_of_turn_text(base_tokenizer, end_of_turn_id(training))
    assert end_text == "<｜end▁of▁sentence｜>"
    template = gguf_export.ollama_template(end_text)
    assert gguf_export.check_template(template, base_tokenizer, training, "You are a human-like AI assistant.") > 100

    messages = [{"role": "system", "content": "Be careful."}, {"role": "user", "content": "Should I?"}]
    ids = base_tokenizer(gguf_export.render_go_template(template, messages))["input_ids"]
    bos, eos = base_tokenizer.bos_token_id, base_tokenizer.eos_token_id
    think = base_tokenizer.convert_tokens_to_ids("<think>")
    assert ids[0] == bos and ids.count(eos) == 2 and ids[-2] == think  # BOS, EOS after each turn, <think> opening
    if vocabulary == "real_base_dir":
        assert (bos, eos, think) == (151646, 151643, 151648)


def test_a_template_writing_im_end_as_text_fails_the_check(real_base_dir):
    """What a naive ChatML Modelfile does: in the base vocabulary <|im_end|> is plain text, not the EOS id."""
    base_tokenizer = AutoTokenizer.from_pretrained(real_base_dir)
    assert len(base_tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"]) > 1
    naive = gguf_export.ollama_template("<|im_end|>")
    with pytest.raises(click.ClickException, match="other ids than training"):
        gguf_export.check_template(naive, base_tokenizer, load_tokenizer(real_base_dir, None), "You are careful.")
