"""Stages of one pipeline execution land under one MLflow parent run (real sqlite store)."""

import os

from pipeline.config import load_params
from pipeline.tracking import RUN_KEY_TAG, stage_run


def test_stages_share_one_parent_per_run_key(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = load_params()
    params = params.model_copy(update={"mlflow": params.mlflow.model_copy(
        update={"artifact_root": str(tmp_path / "artifacts")})})
    runs = {}
    for key, stages in (("first", ["validate", "sft", "evaluate"]), ("second", ["validate"])):
        monkeypatch.setenv("PIPELINE_RUN_KEY", key)
        for stage in stages:
            with stage_run(params, stage) as run:
                runs[(key, stage)] = run.info.run_id

    client = MlflowClient(uri)
    parents = {k: client.get_run(r).data.tags["mlflow.parentRunId"] for k, r in runs.items()}
    first = {parents[("first", s)] for s in ("validate", "sft", "evaluate")}
    assert len(first) == 1
    assert parents[("second", "validate")] not in first
    parent = client.get_run(first.pop())
    assert parent.data.tags[RUN_KEY_TAG] == "first" and "stage" not in parent.data.tags
    assert client.get_run(runs[("first", "sft")]).data.tags["stage"] == "sft"
    assert parent.info.artifact_uri.startswith((tmp_path / "artifacts").as_uri())


def test_an_unreachable_tracking_server_ends_a_command_with_one_clear_line(tmp_path):
    """A stage or command whose MLflow server is down (as in bench/team_faults.py's mlflow-down-in-register) ends,
    once MLflow's client has retried, with one line that names the server and what to do, exit 2, no traceback;
    any other MLflow error still shows its traceback."""
    import socket
    import subprocess
    import sys

    from mlflow.exceptions import MlflowException

    from pipeline.cli import tracking_unreachable

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    code = ("import mlflow\nfrom pipeline.cli import run_cli\n"
            "def main(argv=None):\n    mlflow.get_experiment_by_name('finetune-pipeline')\n"
            "run_cli(main)\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"the MLflow tracking server http://127.0.0.1:{port} does not answer" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert not tracking_unreachable(MlflowException("RESOURCE_DOES_NOT_EXIST: no such experiment"))
