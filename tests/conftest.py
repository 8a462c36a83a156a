"""Shared pytest fixtures."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# What a fresh clone of the project holds that `dvc repro` needs (the repo's tracked project files).
PROJECT_DIRS = ("pipeline", "flows")
PROJECT_FILES = ("dvc.yaml", "params.yaml", ".dvc/config", ".dvc/.gitignore", ".dvcignore", ".gitignore")


@pytest.fixture
def project_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A throwaway git + DVC copy of the project in tmp_path/project, with one commit, and
    MLFLOW_TRACKING_URI pointing at a sqlite file in tmp_path (no outputs, no data copied)."""
    dest = tmp_path / "project"
    for name in PROJECT_DIRS:
        shutil.copytree(REPO_ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in PROJECT_FILES:
        src = REPO_ROOT / name
        if src.exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=pytest", "-c", "user.email=pytest@example.invalid",
                        "-c", "commit.gpgsign=false", *args], cwd=dest, check=True, capture_output=True)

    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "project copy for tests")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return dest
