"""What many tests share: throwaway git + DVC copies of the project, the interpreter's environment, the
MLflow UI server, and the sizes of the tiny model and sample data the stage tests use. Bench scripts use
the project copy too."""

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

from pipeline.env import interpreter_env

REPO_ROOT = Path(__file__).resolve().parents[2]

# What a fresh clone of the project holds that `dvc repro` needs.
PROJECT_DIRS = ("pipeline", "flows", "bin")
PROJECT_FILES = ("dvc.yaml", "params.yaml", "prefect.yaml", ".dvc/config", ".dvc/.gitignore", ".dvcignore", ".gitignore")


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
    env = interpreter_env(PIPELINE_PYTHON=sys.executable)  # bin/stage: a project copy has no .venv of its own
    env.pop("PIPELINE_RUN_KEY", None)
    env.update(extra)
    return env


def dvc(cwd: Path, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=venv_env(**env),
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


MODEL_NAME = "mcq-reading-adapter"

# The tiny base most stage tests run on: smaller than the default params' tiny base, same architecture.
TINY_BASE = {"hidden_size": 64, "num_layers": 1, "num_heads": 2, "intermediate_size": 128, "vocab_size": 600,
             "max_position_embeddings": 256}
# The generated sample data those tests share (the default params' generator, fewer items).
TINY_SAMPLE = {"n_train": 48, "n_eval": 12, "n_validation": 12, "n_domain_lines": 200, "n_heldout_lines": 20}


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
