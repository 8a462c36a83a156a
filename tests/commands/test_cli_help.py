"""`--help` of every command works from any directory (no params.yaml there) and starts nothing.

Each command runs as a subprocess (`<venv python> -m <module> --help`, cwd a temporary directory, the
repo on PYTHONPATH): exit 0, a usage line naming the module, the module docstring's summary, nothing
written, and none of the heavy libraries imported (`-X importtime` lists every import), so `--help`
cannot be loading params, models or a tracking store behind the user's back, and stays fast.
"""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.helpers.project import REPO_ROOT, venv_env

STAGES = [f"pipeline.stages.{m}" for m in ("sample_data", "build_base", "validate", "dapt", "sft", "evaluate", "register")]
COMMANDS = [f"pipeline.commands.{m}" for m in ("predict", "chat", "merge", "rollback", "reproduce", "run_profile", "sweep")]
MODULES = STAGES + COMMANDS + ["pipeline.stages.import_data", "flows.team", "flows.lock", "flows.deploy"]
HEAVY = ("torch", "transformers", "peft", "trl", "datasets", "mlflow", "prefect", "great_expectations", "pandas",
         "pyarrow", "matplotlib", "bitsandbytes")


def summary(module: str) -> str:
    """The first line of a module's docstring, read without importing it."""
    source = REPO_ROOT.joinpath(*module.split(".")).with_suffix(".py").read_text(encoding="utf-8")
    return ast.get_docstring(ast.parse(source)).splitlines()[0]


def run(tmp_path, *args):
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=venv_env(PYTHONPATH=str(REPO_ROOT)),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module", MODULES)
def test_help_works_outside_the_project(module, tmp_path):
    proc = run(tmp_path, "-X", "importtime", "-m", module, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: python -m {module}") and "Traceback" not in proc.stderr
    assert summary(module) in proc.stdout
    assert not (tmp_path / "mlflow").exists() and list(tmp_path.iterdir()) == []  # it wrote nothing
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert not imported & set(HEAVY), f"--help imported {sorted(imported & set(HEAVY))}"


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_refuses_an_unknown_argument(stage, tmp_path):
    proc = run(tmp_path, "-m", stage, "--epochs", "3")
    assert proc.returncode == 2 and "unrecognized arguments: --epochs 3" in proc.stderr
    assert proc.stderr.startswith(f"usage: python -m {stage}") and list(tmp_path.iterdir()) == []


def test_a_stage_called_in_process_leaves_the_command_line_alone(monkeypatch):
    """Tests call `run_cli(validate.main)` under pytest: pytest's own argv is not the stage's to refuse."""
    from pipeline.cli import run_cli
    from pipeline.stages import sample_data

    ran = []

    def main() -> None:  # stands for pipeline.sample_data.main, without generating data
        ran.append(True)

    main.__module__ = sample_data.__name__
    monkeypatch.setattr(sys, "argv", ["pytest", "tests/stages/test_validate_bad_inputs.py", "-k", "x"])
    run_cli(main)
    assert ran == [True]
