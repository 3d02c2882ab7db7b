"""export: the published adapter for engines outside transformers, in models/friction-gguf/.

The adapter as a GGUF LoRA (llama.cpp, Ollama), an Ollama Modelfile whose template is checked against the training
ids, a llama.cpp chat template, and a README with the commands for Ollama, llama.cpp, vLLM and transformers serve.
The library (GGUF writing, templates, engine rules) is friction/gguf_export.py.
"""

from __future__ import annotations

from pathlib import Path

import click

from friction import gguf_export
from friction.artifacts import atomic_output, base_model_reference
from friction.config import Params, load_params
from friction.pipeline import path_option

MODELFILE = "Modelfile"
LLAMA_CPP_TEMPLATE = "chat_template.jinja"
README = "README.md"


def run(params: Params, adapter_dir: Path, manifest_path: Path, out_dir: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    from friction.tokens import end_of_turn_id, load_tokenizer

    adapter = gguf_export.read_adapter(adapter_dir)
    refusals = gguf_export.engine_refusals(adapter)  # first: nothing is loaded or written for an adapter refused
    if refusals:
        reasons = "\n  ".join(refusals)
        raise click.ClickException(f"{adapter_dir}: llama.cpp and vLLM cannot load this adapter:\n  {reasons}")
    location, revision = base_model_reference(manifest_path)
    try:
        architecture = AutoConfig.from_pretrained(location, revision=revision).model_type
        base_tokenizer = AutoTokenizer.from_pretrained(location, revision=revision)  # the base's own vocabulary
    except (OSError, ValueError) as error:
        raise click.ClickException(f"base model {location}: {error}") from None
    training_tokenizer = load_tokenizer(location, revision)  # as mix tokenized the data: <|im_end|> is the EOS id
    end_id = end_of_turn_id(training_tokenizer)
    end_text = gguf_export.end_of_turn_text(base_tokenizer, end_id)
    template = gguf_export.ollama_template(end_text)
    compared = gguf_export.check_template(template, base_tokenizer, training_tokenizer, params.mix.system_prompt)
    # The EOS id stops every engine by itself only where it is the base's EOS; otherwise Ollama needs the text.
    stop = None if end_id is not None and end_id == base_tokenizer.eos_token_id else end_text

    gguf_name = f"friction-lora-{params.export.gguf_type}.gguf"
    with atomic_output(out_dir) as scratch:
        scratch.mkdir()
        written = gguf_export.write_gguf_lora(
            adapter, architecture, params.export.gguf_type, scratch / gguf_name, params.card.model_name
        )
        (scratch / MODELFILE).write_text(
            gguf_export.modelfile(params.export.ollama_from, gguf_name, template, params.mix.system_prompt, stop),
            encoding="utf-8",
        )
        (scratch / LLAMA_CPP_TEMPLATE).write_text(gguf_export.jinja_template(end_text), encoding="utf-8")
        readme = gguf_export.readme(params, adapter, adapter_dir, location, gguf_name, written, stop)
        (scratch / README).write_text(readme, encoding="utf-8")
    for flag, why in gguf_export.vllm_flags(adapter):
        click.echo(f"export: vLLM {flag}: {why}")
    click.echo(
        f"export: {out_dir / gguf_name} ({written['tensors']} tensors, alpha {written['alpha']:g}); "
        f"Modelfile template gives the training ids ({compared} ids checked)"
    )


@click.command()
@path_option("--adapter", "Output of card: the published adapter folder.")
@path_option("--manifest", "Output of fetch: names the base model, whose vocabulary the engines use.")
@path_option("--out", "The GGUF LoRA, the Ollama Modelfile, a llama.cpp chat template and README.md.")
def main(adapter: Path, manifest: Path, out: Path) -> None:
    """Write the adapter for llama.cpp, Ollama and vLLM: GGUF LoRA, Modelfile (template checked against the training
    ids), commands; refuse an adapter those engines cannot load, saying why."""
    run(load_params(), adapter, manifest, out)
