"""The trained adapter for engines outside transformers: a GGUF LoRA for llama.cpp and Ollama, an Ollama Modelfile,
and the checks and flags vLLM needs.

- **GGUF LoRA** (what llama.cpp's `--lora` and Ollama's `ADAPTER` load for a Qwen2 base): `general.type = adapter`,
  `adapter.type = lora`, one `adapter.lora.alpha`, and per module `blk.N.<tensor>.weight.lora_a` / `.lora_b`.
  peft's `lora_A` (r x in) and `lora_B` (out x r) go in as they are; llama.cpp scales B·A by alpha / r, r read from
  each tensor's shape. A module whose peft scale differs from that (rsLoRA, `alpha_pattern`) gets its ratio folded
  into its B, so that scale x B·A is peft's merge delta for every module.
- **Vocabulary.** Those engines run the adapter on the base model's own GGUF and vocabulary, where training's
  `<|im_end|>` (the base's EOS renamed, friction/tokens.py) is spelled as the base spells that id
  (DeepSeek-R1-Distill-Qwen: `<｜end▁of▁sentence｜>`) and `<|im_start|>` is plain text. The Modelfile's template
  therefore writes the EOS text where training had `<|im_end|>`; `check_template` proves it gives the training ids.
- **Refusals.** What no engine here loads is refused with the reason, before anything is written.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np

from friction.chatml import IM_END, IM_START, THINK_OPEN, assistant_content, render

GGUF_TYPES = ("f16", "bf16", "f32", "q8_0")
# HF model_type -> llama.cpp architecture. Only architectures whose LoRA tensors go in without reordering: llama.cpp
# permutes llama's q/k rows on conversion, so a llama adapter's B would need the same permutation.
ARCHITECTURES = {"qwen2": "QWEN2"}
# vLLM's LoRAConfig.max_lora_rank accepts only these (vllm/config/lora.py, MaxLoRARanks); its default is 16.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_RANK = 16
PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)\.weight$")


@dataclass
class Adapter:
    """A peft LoRA adapter folder, read without its base: config and tensors (float32, by module)."""

    folder: Path
    config: dict[str, Any]
    lora_a: dict[str, np.ndarray] = field(default_factory=dict)  # module (model.layers.0.self_attn.q_proj) -> r x in
    lora_b: dict[str, np.ndarray] = field(default_factory=dict)  # module -> out x r
    other_tensors: list[str] = field(default_factory=list)  # saved tensors that are no LoRA pair (biases, embeddings)

    @property
    def ranks(self) -> dict[str, int]:
        return {module: a.shape[0] for module, a in self.lora_a.items()}


def read_adapter(folder: Path) -> Adapter:
    """adapter_config.json and adapter_model.safetensors of `folder`; a clear error naming the file if unreadable."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise click.ClickException(f"{config_path}: missing; run the train stage first (dvc repro train)") from None
    except json.JSONDecodeError as error:
        raise click.ClickException(f"{config_path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise click.ClickException(f"{config_path}: not a JSON object")
    try:
        state = load_file(str(weights_path))
    except FileNotFoundError:
        raise click.ClickException(f"{weights_path}: missing; the adapter folder is incomplete") from None
    except (SafetensorError, OSError) as error:
        raise click.ClickException(f"{weights_path}: not a readable safetensors file ({error})") from None
    adapter = Adapter(folder, config)
    for key, tensor in state.items():
        match = LORA_KEY.match(key)
        if match is None:
            adapter.other_tensors.append(key)
            continue
        array = tensor.to(torch.float32).numpy()  # bf16 has no numpy dtype; the GGUF type is chosen when written
        target = adapter.lora_a if match["part"] == "A" else adapter.lora_b
        target[match["module"].removeprefix(PEFT_PREFIX)] = array
    unpaired = sorted(set(adapter.lora_a) ^ set(adapter.lora_b))
    if unpaired:
        raise click.ClickException(f"{weights_path}: lora_A without lora_B or the reverse for {', '.join(unpaired)}")
    return adapter


def engine_refusals(adapter: Adapter) -> list[str]:
    """Why llama.cpp (and so Ollama and LM Studio) cannot run this adapter as a GGUF LoRA; empty when it can."""
    config, reasons = adapter.config, []
    if config.get("peft_type", "LORA") != "LORA":
        reasons.append(f"peft_type {config.get('peft_type')}: only LoRA adapters have a GGUF form")
    if config.get("use_dora"):
        reasons.append(
            "use_dora: DoRA rescales each weight column by a learned magnitude; llama.cpp and vLLM "
            "apply plain LoRA only (merge it with `friction merge` instead)"
        )
    if config.get("modules_to_save"):
        reasons.append(
            f"modules_to_save {config['modules_to_save']}: fully trained copies of modules are no LoRA; "
            "llama.cpp and vLLM load none (merge instead)"
        )
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        reasons.append("bias / lora_bias: trained biases have no place in llama.cpp's LoRA (merge instead)")
    if config.get("trainable_token_indices") or config.get("target_parameters"):
        reasons.append("trainable_token_indices / target_parameters: not LoRA pairs on linear layers")
    embedding = sorted(
        m for m in adapter.lora_a if m.rsplit(".", 1)[-1] in ("embed_tokens", "lm_head", "wte", "output")
    )
    embedding += [key for key in adapter.other_tensors if "lora_embedding" in key]
    if embedding:
        reasons.append(
            f"LoRA on the embedding or lm_head ({', '.join(embedding)}): llama.cpp applies LoRA to the "
            "linear layers of the blocks only, and vLLM no longer loads embedding LoRA"
        )
    others = [key for key in adapter.other_tensors if "lora_embedding" not in key]
    if others:
        reasons.append(f"tensors that are no lora_A/lora_B pair: {', '.join(sorted(others)[:5])}")
    if not adapter.lora_a:
        reasons.append("no LoRA tensors at all")
    return reasons


def peft_scale(adapter: Adapter, module: str) -> float:
    """The factor peft multiplies B·A by for `module` (alpha / r, or alpha / sqrt(r) with rsLoRA), with its
    rank_pattern and alpha_pattern applied as peft applies them."""
    from peft.utils.other import get_pattern_key

    config = adapter.config
    alpha = float(config["lora_alpha"])
    alpha_pattern = config.get("alpha_pattern") or {}
    if alpha_pattern:
        alpha = float(alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), alpha))
    rank = adapter.ranks[module]
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def gguf_alpha(adapter: Adapter) -> float:
    """The one `adapter.lora.alpha` of the GGUF: llama.cpp's scale is alpha / r, so rsLoRA's alpha / sqrt(r) at one
    rank r is alpha * sqrt(r) / r."""
    alpha = float(adapter.config["lora_alpha"])
    ranks = set(adapter.ranks.values())
    if adapter.config.get("use_rslora") and len(ranks) == 1:
        return alpha * math.sqrt(ranks.pop())
    return alpha


def gguf_tensor_names(adapter: Adapter, architecture: str) -> dict[str, str]:
    """Module (model.layers.0.self_attn.q_proj) -> GGUF weight name (blk.0.attn_q.weight), by gguf's own map."""
    import gguf

    blocks = 1 + max((int(n) for m in adapter.lora_a for n in re.findall(r"\.layers\.(\d+)\.", m)), default=0)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, ARCHITECTURES[architecture]), blocks)
    mapped, unknown = {}, []
    for module in adapter.lora_a:
        name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if name is None:
            unknown.append(module)
        else:
            mapped[module] = name  # get_name keeps the suffix it matched: blk.0.attn_q.weight
    if unknown:
        raise click.ClickException(
            f"{adapter.folder}: no llama.cpp tensor for LoRA module(s) {', '.join(sorted(unknown))}"
        )
    return mapped


def write_gguf_lora(adapter: Adapter, architecture: str, gguf_type: str, out: Path, name: str) -> dict[str, Any]:
    """Write the adapter as a llama.cpp GGUF LoRA; returns what was written (alpha, tensor types, folded scales)."""
    import gguf

    if architecture not in ARCHITECTURES:
        raise click.ClickException(
            f"base model_type {architecture!r}: GGUF LoRA export supports {', '.join(ARCHITECTURES)} (tensors that go "
            "in unchanged); merge with `friction merge` and convert the merged model instead"
        )
    refusals = engine_refusals(adapter)
    if refusals:
        raise click.ClickException(f"{adapter.folder}: llama.cpp cannot load this adapter:\n  " + "\n  ".join(refusals))
    qtype = {
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "f32": gguf.GGMLQuantizationType.F32,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[gguf_type]
    alpha = gguf_alpha(adapter)
    names = gguf_tensor_names(adapter, architecture)
    arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[architecture])
    writer = gguf.GGUFWriter(str(out), arch=gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(name)
    folded, kept_f16 = {}, []
    for module in sorted(adapter.lora_a, key=_module_order):
        lora_a, lora_b = adapter.lora_a[module], adapter.lora_b[module]
        ratio = peft_scale(adapter, module) / (alpha / adapter.ranks[module])
        if not math.isclose(ratio, 1.0, rel_tol=1e-9):
            lora_b = lora_b * np.float32(ratio)
            folded[module] = ratio
        for suffix, array in (("lora_a", lora_a), ("lora_b", lora_b)):
            tensor_name = f"{names[module]}.{suffix}"
            tensor_type = qtype
            if qtype == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
                # q8_0 quantizes blocks of 32 along a row; lora_b's rows are r long (8 for the demo).
                tensor_type = gguf.GGMLQuantizationType.F16
                kept_f16.append(tensor_name)
            data = gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), tensor_type)
            if tensor_type in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32):
                writer.add_tensor(tensor_name, data)
            else:
                writer.add_tensor(tensor_name, data, raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"alpha": alpha, "tensors": 2 * len(names), "folded_scales": folded, "kept_f16": kept_f16}


def _module_order(module: str) -> tuple[int, str]:
    layer = re.search(r"\.layers\.(\d+)\.", module)
    return (int(layer[1]) if layer else -1, module)


# ---------------------------------------------------------------------------------------------------------- vLLM


def vllm_rank_for(ranks: list[int], where: object) -> int:
    """--max-lora-rank: the largest of `ranks` rounded up to a value vLLM accepts; `where` names the adapter."""
    rank = max(ranks)
    allowed = [value for value in VLLM_RANKS if value >= rank]
    if not allowed:
        raise click.ClickException(
            f"{where}: LoRA rank {rank} is above vLLM's largest max_lora_rank ({VLLM_RANKS[-1]})"
        )
    return allowed[0]


def vllm_rank(adapter: Adapter) -> int:
    return vllm_rank_for(list(adapter.ranks.values()), adapter.folder)


def configured_ranks(config: dict[str, Any]) -> list[int]:
    """The ranks an adapter_config.json declares: r and its rank_pattern's."""
    return [int(config["r"]), *(int(rank) for rank in (config.get("rank_pattern") or {}).values())]


def vllm_flags(adapter: Adapter) -> list[tuple[str, str]]:
    """(flag, why) for each `vllm serve` flag this adapter needs beyond the defaults."""
    rank = max(adapter.ranks.values())
    flags = [
        ("--enable-lora", "serves LoRA adapters at all"),
        ("--lora-modules friction=<dir>", "registers this adapter under the model name `friction`"),
    ]
    if rank > VLLM_DEFAULT_RANK:
        flags.append(
            (
                f"--max-lora-rank {vllm_rank(adapter)}",
                f"rank {rank} is above vLLM's default max_lora_rank {VLLM_DEFAULT_RANK}",
            )
        )
    else:
        flags.append((f"--max-lora-rank {vllm_rank(adapter)}", f"rank {rank}; vLLM's allowed values are {VLLM_RANKS}"))
    flags.append(
        (
            "--tokenizer <dir>",
            "vLLM uses the base's tokenizer otherwise: its chat template is DeepSeek's, "
            "not the ChatML the adapter learned, and <|im_end|> would not be the EOS id",
        )
    )
    if adapter.config.get("use_rslora"):
        flags.append(("(none)", "use_rslora: vLLM reads it from adapter_config.json and scales by alpha / sqrt(r)"))
    return flags


def vllm_command(base: str, adapter_dir: str, rank: int) -> str:
    return (
        f"vllm serve {base} --enable-lora --lora-modules friction={adapter_dir} --max-lora-rank {rank} "
        f"--tokenizer {adapter_dir}"
    )


# ------------------------------------------------------------------------------------------- Ollama's Modelfile


def end_of_turn_text(base_tokenizer, end_of_turn_id: int | None) -> str:
    """How the base vocabulary spells training's end of turn: the EOS token's own text (DeepSeek's
    `<｜end▁of▁sentence｜>`), or `<|im_end|>` itself where training had no EOS to map it to."""
    if end_of_turn_id is None:
        return IM_END
    return base_tokenizer.convert_ids_to_tokens(end_of_turn_id)


def ollama_template(end_text: str) -> str:
    """Ollama's TEMPLATE (Go text/template): each message as training wrote it, with `end_text` where training had
    <|im_end|>, then the reply opened as every trained reply was: the assistant header and `<think>`. No BOS: the
    engine adds it (the base GGUF's add_bos_token), as the tokenizer did in training."""
    return (
        f"{{{{- range .Messages }}}}{IM_START}{{{{ .Role }}}}\n{{{{ .Content }}}}\n{end_text}\n{{{{ end }}}}"
        f"{IM_START}assistant\n{THINK_OPEN}\n"
    )


GO_ACTION = re.compile(r"\{\{(-\s)?\s*(.*?)\s*(\s-)?\}\}", re.DOTALL)


def render_go_template(template: str, messages: list[dict[str, str]]) -> str:
    """Render `template` the way Go's text/template does, for the constructs `ollama_template` uses only
    (`range .Messages`, `.Role`, `.Content`, `end`, and the `{{-`/`-}}` whitespace trims); anything else is an error,
    so a template changed beyond them cannot pass the check unnoticed."""
    pieces: list[tuple[str, str]] = []
    position, trim_next = 0, False
    for action in GO_ACTION.finditer(template):
        text = template[position : action.start()]
        text = text.lstrip() if trim_next else text
        pieces.append(("text", text.rstrip() if action[1] else text))
        pieces.append(("action", action[2]))
        position, trim_next = action.end(), bool(action[3])
    tail = template[position:]
    pieces.append(("text", tail.lstrip() if trim_next else tail))

    out: list[str] = []
    index = 0
    while index < len(pieces):
        kind, value = pieces[index]
        if kind == "text":
            out.append(value)
        elif value == "range .Messages":
            end = next(i for i in range(index, len(pieces)) if pieces[i] == ("action", "end"))
            for message in messages:
                for body_kind, body_value in pieces[index + 1 : end]:
                    if body_kind == "text":
                        out.append(body_value)
                    elif body_value in (".Role", ".Content"):
                        out.append(message[body_value[1:].lower()])
                    else:
                        raise ValueError(f"template action {{{{ {body_value} }}}} is not supported by this check")
            index = end
        else:
            raise ValueError(f"template action {{{{ {value} }}}} is not supported by this check")
        index += 1
    return "".join(out)


def modelfile(base_from: str, adapter_file: str, template: str, system_prompt: str, stop: str | None) -> str:
    lines = [
        "# Ollama: `ollama create friction -f Modelfile`, then `ollama run friction`.",
        "# FROM must be the base the adapter was trained on (its GGUF, any quantization); ADAPTER is this folder's",
        "# GGUF LoRA. The template renders the training format in the base's own vocabulary.",
        f"FROM {base_from}",
        f"ADAPTER ./{adapter_file}",
        f'TEMPLATE """{template}"""',
        f'SYSTEM """{system_prompt}"""',
    ]
    if stop is not None:  # the end of turn is not the base's EOS id: Ollama must be told the text
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ the check

SAMPLE_TURNS = [
    (
        "I'm sure quitting my job tomorrow is the right call, everyone says so...",
        ("They sound certain, but everyone is doing a lot of work there.", "What do they know that I don't?"),
        "Maybe. Who is everyone, though? And what happens the month after?",
    ),
    ("My sister says I overthink. 12 texts in a row is normal, right?", ("Twelve is a lot.",), "Is it, for her?"),
]


def sample_conversations(system_prompt: str) -> list[tuple[list[dict[str, str]], list[dict[str, str]]]]:
    """(prompt messages, the trained reply turn) pairs: a first turn, and a second one after a whole exchange."""
    history = [{"role": "system", "content": system_prompt}]
    pairs = []
    for question, thoughts, answer in SAMPLE_TURNS:
        prompt = [*history, {"role": "user", "content": question}]
        reply = {"role": "assistant", "content": assistant_content("\n\n".join(thoughts), answer)}
        pairs.append((prompt, [reply]))
        history = [*prompt, reply]
    return pairs


def check_template(template: str, base_tokenizer, training_tokenizer, system_prompt: str) -> int:
    """Render sample conversations with `template`, tokenize them with the base vocabulary (special tokens parsed,
    BOS added, as llama.cpp and Ollama do) and compare with the training format's ids: the whole conversation as mix
    tokenized it, cut where the reply's `<think>` line ends. Raises with both id lists on a mismatch; returns the
    number of ids compared."""
    compared = 0
    for prompt, reply in sample_conversations(system_prompt):
        rendered = render_go_template(template, prompt)
        engine_ids = base_tokenizer(rendered, add_special_tokens=True)["input_ids"]
        training_text = render([*prompt, *reply])
        reply_opening = f"{IM_START}assistant\n{THINK_OPEN}\n"
        opened = training_text.rindex(reply_opening) + len(reply_opening)
        training_ids = training_tokenizer(training_text, add_special_tokens=True)["input_ids"]
        prefix_ids = training_tokenizer(training_text[:opened], add_special_tokens=True)["input_ids"]
        if training_ids[: len(prefix_ids)] != prefix_ids:  # the cut must fall on a token boundary of training's ids
            raise click.ClickException("template check: the reply's opening is no token boundary of the training ids")
        if engine_ids != prefix_ids:
            raise click.ClickException(
                f"template check: the Modelfile template gives other ids than training for {len(prompt)} messages:\n"
                f"  template: {engine_ids}\n  training: {prefix_ids}"
            )
        compared += len(engine_ids)
    return compared


def jinja_template(end_text: str) -> str:
    """The same rendering as `ollama_template` as a Jinja chat template, for llama.cpp's `llama-server --jinja
    --chat-template-file` (the base GGUF's own template is DeepSeek's, not what the adapter learned). No BOS: the
    engine adds it."""
    return (
        "{%- for message in messages %}"
        f"{{{{- '{IM_START}' + message['role'] + '\\n' + message['content'] + '\\n{end_text}\\n' }}}}"
        "{%- endfor %}"
        f"{{%- if add_generation_prompt %}}{{{{- '{IM_START}assistant\\n{THINK_OPEN}\\n' }}}}{{%- endif %}}"
    )


def readme(
    params, adapter: Adapter, adapter_dir: Path, base: str, gguf_name: str, written: dict, stop: str | None
) -> str:
    """models/friction-gguf/README.md: what the files are and the commands that run them."""
    rank = vllm_rank(adapter)
    flags = "\n".join(f"- `{flag}`: {why}" for flag, why in vllm_flags(adapter))
    notes = []
    if written["folded_scales"]:
        notes.append(
            f"- {len(written['folded_scales'])} module(s) have a peft scale other than alpha / r (rsLoRA "
            "or alpha_pattern): the ratio is folded into their lora_b, so llama.cpp's alpha / r gives "
            "peft's."
        )
    if written["kept_f16"]:
        notes.append(f"- q8_0: {len(written['kept_f16'])} tensors whose rows are not a multiple of 32 long are f16.")
    stop_line = (
        f"The end of turn is not the base's EOS id, so the Modelfile stops on the text `{stop}`."
        if stop
        else "Every turn ends with the base's EOS id, so every engine stops there without a stop string."
    )
    return f"""# {params.card.model_name}: GGUF LoRA and Ollama Modelfile

The LoRA adapter of `{adapter_dir}` (base `{base}`) for engines outside transformers. Written by the `export` stage
(`stages/export.py`); the `friction-adapter-gguf` artifact of dvc.yaml.

| file | what |
|---|---|
| `{gguf_name}` | the adapter as a llama.cpp GGUF LoRA ({params.export.gguf_type}, alpha {written["alpha"]:g}, \
{written["tensors"]} tensors); run it on the base model's own GGUF |
| `Modelfile` | Ollama: FROM `{params.export.ollama_from}`, this adapter, the ChatML template the adapter was trained \
on, the system prompt |
| `chat_template.jinja` | the same template for `llama-server --jinja --chat-template-file` |

The template writes each turn as training did: `<|im_start|>role`, the content, then the base vocabulary's spelling of
the end-of-turn id where training had `<|im_end|>`, and opens the reply with `<think>`. The engine adds BOS. The export
stage tokenized the rendered template with the base's vocabulary and got the training ids. {stop_line}
{chr(10).join(notes)}

## Ollama

```bash
ollama create friction -f Modelfile
ollama run friction "Should I quit my job tomorrow?"
```

## llama.cpp

```bash
llama-server -m <base>.gguf --lora {gguf_name} --jinja --chat-template-file chat_template.jinja
```

`<base>.gguf` is the base model converted by llama.cpp's `convert_hf_to_gguf.py` (any quantization), or a published
GGUF of it. LM Studio runs no LoRA file: give it the merged model (`friction merge --out merged/`, then
`python convert_hf_to_gguf.py merged/ --outfile friction.gguf`), whose tokenizer and chat template are the adapter's.

## vLLM

```bash
{vllm_command(base, str(adapter_dir), rank)}
```

{flags}

## transformers serve (CPU, no other install)

```bash
friction merge --out merged/ && transformers serve merged/ --port 8000
```

`transformers serve` takes a full model folder, not an adapter folder; the merged folder carries the adapter's
tokenizer (its ChatML chat template) and a generation config that stops on the EOS id.
"""
