"""Typed, validated view of params.yaml: every stage loads it through `load_params` before doing any work.

Unknown keys, wrong types and out-of-range values stop the stage with a message naming the key. The file is read
with ruamel's YAML 1.2 loader, as DVC itself does, so `dvc exp run -S train.learning_rate=1e-7` (written as
`1e-07`) stays a float.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import click
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

PARAMS_FILE = Path("params.yaml")
LOCAL_SOURCES_DIR = Path("data/sources")


class Section(BaseModel):
    # strict: "42" is not an int and true is not a float; YAML already gives every scalar its real type.
    # allow_inf_nan=False: YAML's .inf and .nan are floats, but no parameter of a run means them (lora.alpha: .inf
    # would train to NaN, epochs: .inf would never end).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class ModelParams(Section):
    base: str = Field(min_length=1)
    """A Hugging Face Hub model id, or a local directory under data/sources/."""
    revision: str | None
    """Branch, tag or commit of a Hub model (fetch records the commit it resolves to); null for a local directory."""
    max_length: int = Field(ge=64, le=131072)
    load_in_4bit: bool = False
    attn_implementation: Literal["auto", "flash_attention_4", "varlen", "flex_attention", "sdpa"] = "auto"
    """The attention kernel of training (friction/attention.py): docs/training.md#attention-for-packed-rows."""

    @model_validator(mode="after")
    def _revision_matches_location(self) -> ModelParams:
        local = Path(os.path.normpath(self.base)).is_relative_to(LOCAL_SOURCES_DIR)
        if local and self.revision is not None:
            raise ValueError(f"a local base model ({self.base}) has no revision: set model.revision to null")
        if not local and self.revision is None:
            raise ValueError(f"the Hub model {self.base!r} needs a revision (a branch, tag or commit)")
        return self


class SourceParams(Section):
    hub: str | None = None
    """A Hugging Face Hub dataset id (split `train`)."""
    revision: str = "main"
    path: str | None = None
    """A local JSON Lines file under data/sources/, in the same schema as the Hub dataset."""
    format: Literal["friction", "reluctance"]

    @model_validator(mode="after")
    def _one_location(self) -> SourceParams:
        if (self.hub is None) == (self.path is None):
            raise ValueError("give exactly one of 'hub' or 'path'")
        if self.path is not None and not Path(os.path.normpath(self.path)).is_relative_to(LOCAL_SOURCES_DIR):
            # fetch declares data/sources as its DVC dependency; a file elsewhere would change unnoticed.
            raise ValueError(f"local path {self.path!r} must be inside {LOCAL_SOURCES_DIR}/")
        return self


class DataParams(Section):
    sources: dict[str, SourceParams] = Field(min_length=1)


class MixParams(Section):
    weights: dict[str, Annotated[float, Field(ge=0)]]
    """Each source's share of the mix; keys are the names in data.sources. docs/pipeline.md#mixing."""
    weighting: Literal["examples", "tokens"] = "examples"
    """Whether weights are shares of examples or of training tokens: docs/pipeline.md#mixing."""
    target_max: int = Field(ge=1)
    target_fraction: float = Field(gt=0, le=1)
    """With target_max, how many examples the mix asks for: docs/pipeline.md#mixing."""
    validation_fraction: float = Field(gt=0, lt=1)
    system_prompt: str = Field(min_length=1)
    on_bad_rows: Literal["drop", "fail"] = "drop"


class PackParams(Section):
    strategy: Literal["bfd", "stacked"] = "bfd"
    """Layout and loss masking of the rows: docs/pipeline.md#packing."""
    overflow: Literal["truncate", "split", "drop"] = "truncate"
    """What becomes of an example longer than model.max_length: docs/pipeline.md#packing."""


class LoraParams(Section):
    rank: int = Field(ge=1)
    alpha: float = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    target_modules: list[str] = Field(min_length=1)


class TrainParams(Section):
    epochs: float = Field(gt=0)
    max_steps: int = Field(default=-1, ge=-1)
    """-1 trains for `epochs`; a positive value caps the run at that many optimizer steps."""
    batch_size: int = Field(ge=1)
    grad_accum: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(ge=0, lt=1)
    optimizer: str = "adamw_torch"
    weight_decay: float = Field(ge=0)
    max_grad_norm: float = Field(gt=0)
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    eval_steps: int = Field(ge=1)
    early_stopping_patience: int = Field(ge=1)
    early_stopping_threshold: float = Field(ge=0)
    gradient_checkpointing: bool = True
    logging_steps: int = Field(default=10, ge=1)
    backend: Literal["auto", "unsloth", "hf"] = "auto"
    """Which library loads and trains the model: docs/training.md#training-backends."""
    gpus: int = Field(default=1, ge=1)
    """Data-parallel processes, one per GPU (friction/distributed.py): docs/training.md#scaling-out."""


class EvaluateParams(Section):
    max_new_tokens: int = Field(ge=1)
    temperature: float = Field(ge=0)
    """0 decodes greedily."""
    top_p: float = Field(gt=0, le=1)
    batch_size: int = Field(ge=1)
    max_prompts: int | None = Field(default=None, ge=1)
    """Evaluate N prompts of data/eval/prompts.jsonl, taken in turn from each category (the first of every category,
    then the second, ...) so that a subset still covers them all; null takes them all."""
    samples_per_prompt: int = Field(default=1, ge=1)
    """Answers sampled per prompt and model, each with its own seed; metrics are averaged within a prompt before the
    statistics over prompts. Greedy decoding (temperature 0) makes it 1: every sample would be the same."""


class JudgeParams(Section):
    """The optional judge stage (stages/judge.py): a model behind an OpenAI-compatible server compares base and
    adapter answers pairwise. The server's URL and key come from the environment, never from params."""

    enabled: bool = False
    model: str | None = None
    """The judge model's name as the server's /v1/models lists it."""
    rubric: str = "data/eval/judge_rubric.md"
    verdict: Literal["choice", "text"] = "text"
    """choice: a constrained choice between the labels (transformers serve's /v1/systemone typed decision: always a
    label). text: the judge writes its verdict, which must name exactly one label (any OpenAI-compatible server:
    vLLM, Ollama, llama.cpp); text naming none is unscored."""
    base_url_env: str = "FRICTION_JUDGE_BASE_URL"
    api_key_env: str = "FRICTION_JUDGE_API_KEY"
    max_tokens: int = Field(default=16, ge=1)
    """Tokens the judge may write for a text verdict."""
    timeout_s: float = Field(default=120, gt=0)

    @model_validator(mode="after")
    def _model_when_enabled(self) -> JudgeParams:
        if self.enabled and not self.model:
            raise ValueError("judge.enabled needs judge.model (the name the server's /v1/models lists)")
        return self


class CardParams(Section):
    model_name: str = Field(min_length=1)
    license: str = Field(min_length=1)
    tags: list[str] = []


class ExportParams(Section):
    gguf_type: Literal["f16", "bf16", "f32", "q8_0"] = "f16"
    """The GGUF LoRA's tensor type. q8_0 keeps in f16 the tensors whose rows are not a multiple of 32 long (lora_B's
    rows are r long)."""
    ollama_from: str = Field(min_length=1)
    """The Modelfile's FROM: the Ollama library tag of the recipe's base, or a path to the base's GGUF (relative to
    models/friction-gguf/). It must be the base the adapter was trained on."""


class Params(Section):
    recipe: str = Field(min_length=1)
    """The recipe's name (recipes/<name>.yaml); the card says which one it ran."""
    seed: int = Field(ge=0, le=2**32 - 1)
    """numpy's and torch's seeding (what train calls) takes at most 2^32 - 1."""
    model: ModelParams
    data: DataParams
    mix: MixParams
    pack: PackParams
    lora: LoraParams
    train: TrainParams
    evaluate: EvaluateParams
    judge: JudgeParams = JudgeParams()
    card: CardParams
    export: ExportParams

    @model_validator(mode="after")
    def _weights_name_sources(self) -> Params:
        unknown = sorted(set(self.mix.weights) - set(self.data.sources))
        if unknown:
            raise ValueError(f"mix.weights names sources not in data.sources: {', '.join(unknown)}")
        missing = sorted(set(self.data.sources) - set(self.mix.weights))
        if missing:
            raise ValueError(f"mix.weights has no weight for: {', '.join(missing)}")
        return self


def _describe(error: ValidationError) -> str:
    lines = []
    for problem in error.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        lines.append(f"  {key}: {problem['msg']}")
    return "\n".join(lines)


def load_params(path: Path = PARAMS_FILE) -> Params:
    """Read and validate the params file; raise a click error naming the file and key on any problem."""
    try:
        raw = YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise click.ClickException(f"{path}: not found (run from the repository root)") from None
    except YAMLError as error:
        raise click.ClickException(f"{path}: not valid YAML:\n{error}") from None
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise click.ClickException(f"{path}: invalid parameters:\n{_describe(error)}") from None
