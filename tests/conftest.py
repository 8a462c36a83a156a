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
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Under pytest-xdist each worker gets its share of the cores for torch's (and BLAS') thread pools: two
# workers with two threads each on 2 cores spend their time spinning (measured: `make test` 19 min with
# the default pools, 10 min with one thread per worker). Set before any test module imports torch;
# stage subprocesses inherit it. An explicit OMP_NUM_THREADS wins.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_name, _threads)

# The module that runs the whole default pipeline goes first, so the other worker takes every other module
# meanwhile (`make test` passes --no-loadscope-reorder; xdist would otherwise order files by test count).
RUN_FIRST = ("tests/test_pipeline_e2e.py",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in RUN_FIRST)  # stable: the rest keeps its order

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

# The tiny base most stage tests run on: smaller than the default params' tiny base, same architecture.
TINY_BASE = {"hidden_size": 64, "num_layers": 1, "num_heads": 2, "intermediate_size": 128, "vocab_size": 600,
             "max_position_embeddings": 256}
# The generated sample data those tests share (the default params' generator, fewer items).
TINY_SAMPLE = {"n_train": 48, "n_eval": 12, "n_validation": 12, "n_domain_lines": 200, "n_heldout_lines": 20}


@dataclass(frozen=True)
class TinyWorld:
    """Generated sample data and a tiny base built from it, as the `sample_data` and `base` stages make them.

    Shared by the test modules of one test process: read it, link it, copy it; never write into it.
    """

    data: Path  # train/validation/eval .jsonl, domain_train/domain_eval/general_eval .txt
    base: Path  # a tiny Llama with its byte-level tokenizer and chat template
    tiny: dict  # base.tiny params the base was built with
    seed: int

    def link_into(self, root: Path, data: str = "data", base: str = "base") -> Path:
        """root/<data> and root/<base> as links to the shared data and base (root itself is the caller's)."""
        for name, target in ((data, self.data), (base, self.base)):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).symlink_to(target, target_is_directory=True)
        return root


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> TinyWorld:
    """The sample data + tokenizer + tiny base builder, once per test process (see TinyWorld)."""
    from pipeline.modeling.tiny import build_tiny_base, tokenizer_texts
    from pipeline.config import TinyModelParams, load_params
    from pipeline.data.synthetic import generate

    root = tmp_path_factory.mktemp("tiny_world")
    params = load_params(REPO_ROOT / "params.yaml")
    sample = params.sample_data.model_copy(update={**TINY_SAMPLE, "out_dir": str(root / "data")})
    generate(sample, sample.num_choices, params.seed, root / "data")
    # What the base stage trains its tokenizer on: the rendered training chats and the domain corpus.
    texts = tokenizer_texts(params.model_copy(update={"sample_data": sample}))
    build_tiny_base(texts, TinyModelParams(**TINY_BASE), params.seed, root / "base")
    return TinyWorld(data=root / "data", base=root / "base", tiny=dict(TINY_BASE), seed=params.seed)


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
