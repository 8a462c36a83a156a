"""`--help` of every command works from any directory (no params.yaml there) and starts nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, venv_env

STAGES = ["sample_data", "base", "validate", "dapt", "sft", "evaluate", "register"]
TOOLS = ["predict", "interactive", "merge", "rollback", "reproduce"]
MODULES = [f"pipeline.{m}" for m in STAGES + TOOLS] + ["flows.lock", "flows.deploy"]


def run(tmp_path, *args):
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=venv_env(PYTHONPATH=str(REPO_ROOT)),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module", MODULES)
def test_help_works_outside_the_project(module, tmp_path):
    proc = run(tmp_path, "-m", module, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout and "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow").exists() and list(tmp_path.iterdir()) == []  # it wrote nothing


def test_a_stage_refuses_an_unknown_argument(tmp_path):
    proc = run(tmp_path, "-m", "pipeline.sft", "--epochs", "3")
    assert proc.returncode == 2 and "unrecognized arguments: --epochs 3" in proc.stderr
