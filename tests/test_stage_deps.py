"""dvc.yaml's code dependencies are exactly what each stage runs: the project modules it imports, transitively.

Read from the code by an AST walk (every `import` and `from ... import`, at any depth of a module, since stages
import some modules lazily), so that a new import that dvc.yaml does not declare fails here instead of leaving
`dvc status` clean while a stage's output would change.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO
from ruamel.yaml import YAML

PACKAGES = ("friction", "stages")
STAGES = YAML(typ="safe").load((REPO / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    """The file of project module `name` (`friction.config` -> friction/config.py), None for anything else."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO / name.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from friction import hub`
    return names


def code_of(stage: str) -> set[str]:
    """stages/__main__.py (what `python -m stages` runs), the stage's module and everything they import."""
    todo = [REPO / "stages/__main__.py", REPO / f"stages/{stage}.py"]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(found for name in imported_modules(path) if (found := module_file(name)) is not None)
    # Package __init__ files hold a docstring only (test below), so editing them changes no output.
    return {path.relative_to(REPO).as_posix() for path in seen if path.name != "__init__.py"}


def declared_code(stage: str) -> set[str]:
    deps = [next(iter(dep)) if isinstance(dep, dict) else dep for dep in STAGES[stage].get("deps", [])]
    return {dep for dep in deps if dep.endswith(".py")}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_stage_declares_exactly_the_code_it_runs(stage: str):
    assert STAGES[stage]["cmd"].split()[:4] == ["python", "-m", "stages", stage]
    imported, declared = code_of(stage), declared_code(stage)
    assert not imported - declared, f"dvc.yaml's {stage} stage misses deps: {sorted(imported - declared)}"
    assert not declared - imported, (
        f"dvc.yaml's {stage} stage declares code it does not run: {sorted(declared - imported)}"
    )


def test_package_init_files_hold_no_code():
    for init in [REPO / package / "__init__.py" for package in PACKAGES] + [REPO / "friction/commands/__init__.py"]:
        body = ast.parse(init.read_text()).body
        assert all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body), init
