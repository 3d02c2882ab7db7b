"""What dvc.yaml declares, read where code needs it, so that each path is written in one place.

dvc.yaml's `cmd:` lines pass every stage its paths (the CLI has no defaults for them), and its `artifacts:` section
names the publishable model folder that `friction chat`, `merge` and `push` use unless told otherwise.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import click
from ruamel.yaml import YAML, YAMLError

DVC_YAML = Path("dvc.yaml")
ARTIFACT = "friction-adapter"  # the model artifact's name in dvc.yaml; gto tags its versions `friction-adapter@v1.0.0`
GGUF_ARTIFACT = "friction-adapter-gguf"  # the export stage's folder (GGUF LoRA, Modelfile), released with it


def released_artifacts(path: Path = DVC_YAML) -> list[str]:
    """The artifacts `friction release` tags together: the adapter, and its GGUF export where dvc.yaml declares it."""
    declared = read_dvc_yaml(path).get("artifacts", {})
    return [name for name in (ARTIFACT, GGUF_ARTIFACT) if name in declared]


def read_dvc_yaml(path: Path = DVC_YAML) -> dict[str, Any]:
    try:
        return YAML(typ="safe").load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise click.ClickException(f"{path}: missing; run friction from the repository's root") from None
    except YAMLError as error:
        raise click.ClickException(f"{path}: not valid YAML ({error})") from None


def stage_argv(stage: str, path: Path = DVC_YAML, **paths: Path | str) -> list[str]:
    """The command line dvc.yaml runs for `stage`, as arguments (e.g. ["friction", "mix", "--raw", "data/raw", ...]).

    `paths` replace some of its paths (`metrics="x.json"` sets --metrics), e.g. so that a benchmark writes beside a
    workspace's own outputs instead of over them.
    """
    stages = read_dvc_yaml(path).get("stages", {})
    if stage not in stages:
        raise click.ClickException(f"{path}: no stage {stage!r} (stages: {', '.join(stages)})")
    argv = shlex.split(stages[stage]["cmd"])
    for name, value in paths.items():
        argv[argv.index("--" + name.replace("_", "-")) + 1] = str(value)
    return argv


def artifact_path(name: str = ARTIFACT, path: Path = DVC_YAML) -> Path:
    """The folder dvc.yaml's `artifacts:` entry `name` points at, relative to the repository's root."""
    artifacts = read_dvc_yaml(path).get("artifacts", {})
    if name not in artifacts:
        raise click.ClickException(f"{path}: no artifact {name!r} under artifacts:")
    return Path(artifacts[name]["path"])


def path_option(name: str, help_text: str):
    """A required path option: a stage's paths are named once, in dvc.yaml's `cmd:` line."""
    return click.option(name, type=click.Path(path_type=Path), required=True, help=help_text)
