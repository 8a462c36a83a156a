"""Stages of one pipeline execution land under one MLflow parent run (real sqlite store)."""

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
