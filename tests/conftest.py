"""Shared pytest fixtures: throwaway git + DVC copies of the project, with their own MLflow store."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# What a fresh clone of the project holds that `dvc repro` needs.
PROJECT_DIRS = ("pipeline", "flows", "bin")
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
    env["PIPELINE_PYTHON"] = sys.executable  # bin/stage: a project copy has no .venv of its own
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


MODEL_NAME = "mcq-reading-adapter"


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory):
    """One `dvc repro` of the default params in a fresh git repo with its own MLflow store (session-wide)."""
    root = tmp_path_factory.mktemp("e2e")
    project = make_project_copy(root / "project")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    proc = dvc(project, "repro", MLFLOW_TRACKING_URI=uri, PIPELINE_RUN_KEY="e2e-first-run")
    return {"project": project, "uri": uri, "stdout": proc.stdout}


@pytest.fixture()
def client(pipeline_run, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", pipeline_run["uri"])
    mlflow.set_tracking_uri(pipeline_run["uri"])
    return MlflowClient(pipeline_run["uri"])


@contextlib.contextmanager
def mlflow_ui(store: Path, cwd: Path, timeout: float = 90) -> Iterator[str]:
    """`make ui` over the MLflow store in `store` (mlflow.db, artifacts/) on a free 127.0.0.1 port.

    Yields the base URL once /health answers; stops the server's whole process group on exit.
    """
    venv = Path(sys.executable).parent.parent
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The server logs every request: a file, not a pipe nobody drains, so it never blocks on a full pipe.
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(
            ["make", "-f", str(REPO_ROOT / "Makefile"), "-o", str(venv / ".installed"), "ui", f"VENV={venv}",
             f"MLFLOW_STORE={store}", f"MLFLOW_PORT={port}"],
            cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"

        def output() -> str:
            log.seek(0)
            return log.read().decode(errors="replace")[-3000:]

        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    urllib.request.urlopen(f"{base}/health", timeout=2)
                    break
                except OSError:
                    assert server.poll() is None, output()
                    assert time.monotonic() < deadline, f"MLflow server did not come up in {timeout:.0f} s\n{output()}"
                    time.sleep(1)
            yield base
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
