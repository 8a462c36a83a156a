"""Shared pytest fixtures: throwaway git + DVC copies of the project, with their own MLflow store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# What a fresh clone of the project holds that `dvc repro` needs.
PROJECT_DIRS = ("pipeline", "flows")
PROJECT_FILES = ("dvc.yaml", "params.yaml", ".dvc/config", ".dvc/.gitignore", ".dvcignore", ".gitignore")


def git(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-c", "user.name=pytest", "-c", "user.email=pytest@example.invalid",
                           "-c", "commit.gpgsign=false", *args], cwd=cwd, check=True, capture_output=True, text=True)


def make_project_copy(dest: Path) -> Path:
    """Copy the project's source and config (no outputs, no data) into dest and commit it."""
    for name in PROJECT_DIRS:
        shutil.copytree(REPO_ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in PROJECT_FILES:
        src = REPO_ROOT / name
        if src.exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "project copy for tests")
    return dest


def venv_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: this interpreter's bin dir first, so `python -m` and `dvc` match it."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env.pop("PIPELINE_RUN_KEY", None)
    env.update(extra)
    return env


def dvc(cwd: Path, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=venv_env(**env),
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def project_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A throwaway git + DVC copy of the project in tmp_path/project, with one commit, and
    MLFLOW_TRACKING_URI pointing at a sqlite file in tmp_path (no outputs, no data copied)."""
    dest = make_project_copy(tmp_path / "project")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return dest
