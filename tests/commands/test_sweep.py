"""`python -m pipeline.commands.sweep` (what `make sweep` runs): a 2×2 grid as queued DVC experiments on the tiny model,
each its own MLflow run under the sweep's run, compared in `dvc exp show` and a chart, the best one applied
and registered through the gate. Real DVC queue workers, real MLflow store, no mocks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.project import MODEL_NAME, TINY_BASE, dvc, git, venv_env

GRID = ["sft.adversarial.method=fgm,pgd", "sft.learning_rate=0.002,0.004"]
DATA = {"train": "train.jsonl", "validation": "validation.jsonl", "eval": "eval.jsonl",
        "domain_corpus": "domain_train.txt", "domain_eval": "domain_eval.txt", "general_eval": "general_eval.txt"}


def small_project(project: Path, tiny_world) -> None:
    """The project copy on the shared tiny data and a smaller tiny base, short training, its baseline committed."""
    from dvc.utils.hydra import apply_overrides

    shutil.copytree(tiny_world.data, project / "data/own")
    apply_overrides(str(project / "params.yaml"),
                    [f"data.{k}.path=data/own/{v}" for k, v in DATA.items()]
                    + [f"base.tiny.{k}={v}" for k, v in TINY_BASE.items()]
                    + ["dapt.max_steps=10", "sft.max_steps=24", "sft.eval_steps=12", "sft.save_steps=12",
                       "sft.batch_size=4"])
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "tiny sweep project")


@pytest.mark.extended
def test_a_two_by_two_sweep_runs_from_one_command_and_promotes_its_best(project_copy, tiny_world, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    small_project(project_copy, tiny_world)
    uri = venv_env()["MLFLOW_TRACKING_URI"]
    proc = subprocess.run([sys.executable, "-m", "pipeline.commands.sweep", *(a for s in GRID for a in ("-S", s))],
                          cwd=project_copy, env=venv_env(), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((project_copy / "reports/sweep.json").read_text(encoding="utf-8"))
    names = summary["experiments"]
    assert len(names) == 4 and not summary["failed"], summary
    assert sorted(tuple(sorted(o)) for o in summary["overrides"].values()) == sorted(
        (a, b) for a in ("sft.adversarial.method=fgm", "sft.adversarial.method=pgd")
        for b in ("sft.learning_rate=0.002", "sft.learning_rate=0.004"))

    # dvc exp show lists the four experiments with their params and metrics
    shown = json.loads(dvc(project_copy, "exp", "show", "--json").stdout)
    experiments = {e["name"]: e for baseline in shown for e in (baseline.get("experiments") or [])}
    assert set(names) <= set(experiments), experiments.keys()
    for name in names:
        revs = experiments[name]["revs"][0]["data"]
        swept = revs["params"]["params.yaml"]["data"]["sft"]
        assert f"sft.adversarial.method={swept['adversarial']['method']}" in summary["overrides"][name]
        assert 0 <= revs["metrics"]["metrics/eval.json"]["data"]["tuned_accuracy"] <= 1
    assert "tuned_accuracy" in proc.stdout  # the `dvc exp show --md` table was printed

    # MLflow: one sweep run, four experiment runs under it, each with its params and metrics; the chart
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("finetune-pipeline")
    sweep = client.get_run(summary["run_id"])
    assert sweep.info.status == "FINISHED" and sweep.data.tags["best_experiment"] == summary["best"]
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{sweep.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(names)
    for run in children:
        method = run.data.params["sft.adversarial.method"]
        assert f"sft.adversarial.method={method}" in summary["overrides"][run.info.run_name]
        assert run.data.metrics["tuned_accuracy"] == pytest.approx(summary["scores"][run.info.run_name])
        stages = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
        assert {"sft", "evaluate"} <= {r.data.tags["stage"] for r in stages}  # the stages ran inside the experiment
    artifacts = {a.path for a in client.list_artifacts(sweep.info.run_id, "sweep")}
    assert {"sweep/comparison.png", "sweep/dvc_exp_show.md", "sweep/summary.json"} <= artifacts
    png = Path(client.download_artifacts(sweep.info.run_id, "sweep/comparison.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The best experiment is in the workspace and went through the gate into the registry
    # The best is chosen on the validation split (each experiment's metrics/sft.json as DVC recorded it), not on eval
    best, validation = summary["best"], summary["validation"]
    for name in names:
        recorded = experiments[name]["revs"][0]["data"]["metrics"]["metrics/sft.json"]["data"]
        assert validation[name] == {"sft_validation_answer_accuracy": recorded["validation_answer_accuracy"],
                                    "sft_validation_loss": recorded["validation_loss"]}
    assert best == min(names, key=lambda n: (-validation[n]["sft_validation_answer_accuracy"],
                                             validation[n]["sft_validation_loss"], names.index(n)))
    params = yaml.safe_load((project_copy / "params.yaml").read_text(encoding="utf-8"))
    for override in summary["overrides"][best]:
        key, value = override.split("=")
        node = params
        for part in key.split("."):
            node = node[part]
        assert str(node) == value, (key, node)
    registry = summary["registered"]
    version = client.get_model_version(MODEL_NAME, registry["version"])
    assert version.tags["promotion"] and registry["alias"] in ("champion", "challenger")
    trained = json.loads(version.tags["params_json"])["sft"]
    assert f"sft.adversarial.method={trained['adversarial']['method']}" in summary["overrides"][best]
    assert f"sft.learning_rate={trained['learning_rate']}" in summary["overrides"][best]
    assert dvc(project_copy, "status").stdout.strip().endswith("up to date.")  # the applied best is what is registered


def test_the_best_experiment_is_the_best_on_validation_not_on_eval():
    from pipeline.commands.sweep import best_experiment

    def scores(eval_accuracy: float, accuracy: float, loss: float) -> dict:
        return {"tuned_accuracy": eval_accuracy, "sft_validation_answer_accuracy": accuracy,
                "sft_validation_loss": loss}

    results = {"eval-favourite": scores(0.9, 0.5, 1.0), "validation-best": scores(0.6, 0.7, 2.0),
               "tie-lower-loss": scores(0.1, 0.7, 1.5)}
    assert best_experiment(results) == "tie-lower-loss"
    assert best_experiment({k: v for k, v in results.items() if k != "tie-lower-loss"}) == "validation-best"
    assert best_experiment({"no-validation": {"tuned_accuracy": 1.0}}) is None


def test_applying_and_registering_the_best_waits_for_the_checkouts_pipeline_lock(tmp_path, monkeypatch):
    """`dvc exp apply` + `dvc repro register` change the workspace: never beside a scheduled or manual run."""
    from flows.lock import PipelineBusy, pipeline_lock
    from pipeline.commands.sweep import promote_best

    monkeypatch.chdir(tmp_path)
    held: list[str] = []
    with pipeline_lock(tmp_path, "a scheduled run", log=held.append):
        monkeypatch.setenv("PIPELINE_LOCK_TIMEOUT", "1")
        with pytest.raises(PipelineBusy, match="a scheduled run"):
            promote_best("exp-best", "0" * 40, {}, "key-exp-best")
    assert not (tmp_path / "reports").exists()  # nothing applied, nothing registered
