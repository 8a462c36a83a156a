"""The tree draws the architecture, and these rules keep it that way.

Stages (pipeline/stages/) and commands (pipeline/commands/) sit on top of components (pipeline/data, modeling,
training, evaluation, registry) and the shared modules (config, artifacts, errors, cli, ...): a component never
imports a stage or a command, a stage never imports another stage, and so DVC never reruns a stage because
an unrelated one changed. Stage modules stay thin; the paths stages hand to each other are named once, in
pipeline/artifacts.py, and dvc.yaml declares exactly those.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from pipeline import artifacts
from tests.helpers.imports import REPO, import_closure

TOP = ("pipeline.stages", "pipeline.commands")
COMPONENTS = ("data", "modeling", "training", "evaluation", "registry")
MAX_MODULE_LINES = 300  # above this, the module's docstring says why ("over 300 lines")
MAX_STAGE_FUNCTION_LINES = 60


def modules(package: str) -> list[str]:
    root = REPO.joinpath(*package.split("."))
    return sorted(f"{package}.{p.stem}" for p in root.glob("*.py") if p.stem != "__init__")


SHARED = modules("pipeline")
COMPONENT_MODULES = [m for c in COMPONENTS for m in modules(f"pipeline.{c}")]
STAGES = modules("pipeline.stages")


@pytest.mark.parametrize("module", SHARED + COMPONENT_MODULES + modules("flows"))
def test_no_component_imports_a_stage_or_a_command(module):
    above = sorted(m for m in import_closure(module) if m.startswith(TOP) and m not in TOP)
    assert not above, f"{module} imports {', '.join(above)}: components sit below stages and commands"


@pytest.mark.parametrize("module", STAGES)
def test_a_stage_imports_no_other_stage_and_no_command(module):
    others = sorted(m for m in import_closure(module) if m.startswith(TOP) and m not in (*TOP, module))
    assert not others, f"{module} imports {', '.join(others)}: move what they share into a component"


def test_the_layout_rules_would_catch_an_upward_import():
    """The closure these rules read sees a component's import of a stage (the rule can fail)."""
    from tests.helpers.imports import imported_modules

    assert "pipeline.stages.evaluate" in imported_modules(
        "pipeline.registry.probe", "def f():\n    from pipeline.stages.evaluate import main\n")


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO).as_posix() for d in ("pipeline", "flows")
                                        for p in (REPO / d).rglob("*.py")))
def test_a_long_module_says_why(path):
    source = (REPO / path).read_text(encoding="utf-8")
    lines = source.count("\n")
    doc = ast.get_docstring(ast.parse(source)) or ""
    assert lines <= MAX_MODULE_LINES or "over 300 lines" in doc.lower(), (
        f"{path}: {lines} lines; split it, or say in its docstring why it is over 300 lines")


@pytest.mark.parametrize("module", STAGES)
def test_stage_functions_are_short(module):
    path = REPO.joinpath(*module.split(".")).with_suffix(".py")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > MAX_STAGE_FUNCTION_LINES]
    assert not long, f"{module}: {', '.join(long)}; a stage reads inputs, calls components, writes outputs"


def test_every_hand_off_path_is_one_dvc_yaml_declares():
    """Each fixed path in pipeline/artifacts.py is an out, metric or plot of exactly the stages that write it."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    declared = set()
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind) or []:
                declared.update(entry if isinstance(entry, dict) else [entry])
    paths = {name: value for name, value in vars(artifacts).items() if isinstance(value, Path)}
    assert len(paths) >= 10
    missing = sorted(f"{name} ({value.as_posix()})" for name, value in paths.items() if value.as_posix() not in declared)
    assert not missing, f"pipeline/artifacts.py names paths dvc.yaml does not declare: {', '.join(missing)}"


def test_no_stage_spells_a_hand_off_path():
    """The stages take the fixed paths from pipeline/artifacts.py instead of writing them as literals."""
    literals = {value.as_posix() for value in vars(artifacts).values() if isinstance(value, Path)}
    for module in STAGES:
        path = REPO.joinpath(*module.split(".")).with_suffix(".py")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        found = {n.value for stmt in body for n in ast.walk(stmt)
                 if isinstance(n, ast.Constant) and n.value in literals}
        assert not found, f"{module} spells {sorted(found)}: use pipeline.artifacts"


def test_a_built_wheel_holds_every_package():
    """pyproject.toml finds the packages (setuptools' own finder, as a build runs it): every directory of
    pipeline/ and flows/ that holds Python is one, so an installed wheel has the whole tree."""
    import tomllib

    from setuptools import find_packages

    find = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"]["find"]
    found = set(find_packages(str(REPO), include=find["include"]))
    on_disk = {p.parent.relative_to(REPO).as_posix().replace("/", ".")
               for d in ("pipeline", "flows") for p in (REPO / d).rglob("*.py") if "__pycache__" not in p.parts}
    assert on_disk <= found and found <= on_disk | {"pipeline", "flows"}, (on_disk, found)
    # Files other than Python that a package reads at run time are its package data (the Modelfile check's Go).
    data = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["package-data"]
    others = [p for d in ("pipeline", "flows") for p in (REPO / d).rglob("*") if p.is_file() and p.suffix not in
              (".py", ".pyc")]
    for path in others:
        package = path.parent.relative_to(REPO).as_posix().replace("/", ".")
        assert any(path.match(pattern) for pattern in data.get(package, [])), f"{path}: not in package-data"
