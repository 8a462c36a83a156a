"""End to end: `dvc repro` of the default params in a fresh git repo, then what a user checks.

One full run (the shipped params, nothing shrunk; fixture `pipeline_run` in conftest.py) is shared by
these tests; the last test breaks the data and checks that nothing after `validate` runs.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import MODEL_NAME, dvc, git, mlflow_ui, venv_env

# The MLflow UI in headless Chromium, on this module's pipeline run (tests/ui_browser.py). Imported here so
# that `pytest -n 2 --dist loadfile` runs it in the same worker: the default pipeline runs once.
from tests.ui_browser import test_ui_in_chromium_shows_the_pipeline_run_and_the_champion  # noqa: E402,F401

pytestmark = pytest.mark.slow  # the whole default pipeline


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tuned_model_beats_base_and_dapt_lowers_domain_perplexity(pipeline_run):
    metrics = json.loads((pipeline_run["project"] / "metrics/eval.json").read_text())
    # Margins from the issue, on numbers this run measured.
    assert metrics["tuned_accuracy"] - metrics["base_accuracy"] >= 0.25, metrics
    assert metrics["dapt_ppl_domain"] <= 0.8 * metrics["base_ppl_domain"], metrics
    assert metrics["n_items"] >= 100
    preds = [json.loads(line) for line in (pipeline_run["project"] / "reports/predictions.jsonl").read_text().splitlines()]
    assert len(preds) == metrics["n_items"]
    tuned_acc = sum(p["tuned_prediction"] == p["answer"] for p in preds) / len(preds)
    assert tuned_acc == pytest.approx(metrics["tuned_accuracy"])
    for kind in ("explicit", "ordinal", "lookup"):
        assert 0.0 <= metrics[f"tuned_accuracy_{kind}"] <= 1.0
    # Generation: the tuned model answers and stops; the random base does neither.
    assert metrics["tuned_eos_rate"] > metrics["base_eos_rate"]
    assert metrics["tuned_generation_em"] > metrics["base_generation_em"]


def test_second_repro_is_a_no_op(pipeline_run):
    project = pipeline_run["project"]
    lock_before = (project / "dvc.lock").read_text()
    proc = dvc(project, "repro", MLFLOW_TRACKING_URI=pipeline_run["uri"])
    assert "Data and pipelines are up to date." in proc.stdout, proc.stdout
    assert "Running stage" not in proc.stdout
    assert (project / "dvc.lock").read_text() == lock_before
    lock = yaml.safe_load(lock_before)
    assert set(lock["stages"]) == {"sample_data", "base", "validate", "dapt", "sft", "evaluate", "register"}


def test_adapter_loads_with_plain_peft_and_changes_the_model(pipeline_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    project = pipeline_run["project"]
    config = json.loads((project / "models/adapter/adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert (project / "models/base/model.safetensors").exists()
    tokenizer = AutoTokenizer.from_pretrained(project / "models/adapter")
    base = AutoModelForCausalLM.from_pretrained(project / "models/dapt")
    ids = torch.tensor([tokenizer("지문을 읽고 질문의 답을 구하세요.")["input_ids"]])
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, project / "models/adapter")
        after = tuned(ids).logits
    assert not torch.allclose(before, after), "the adapter changes nothing"


def test_registry_holds_champion_version_with_lineage(pipeline_run, client):
    project = pipeline_run["project"]
    metrics = json.loads((project / "metrics/eval.json").read_text())
    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(version.version) == "1"
    tags = version.tags
    assert tags["git_commit"] == git(project, "rev-parse", "HEAD").stdout.strip()
    assert tags["data_train_md5"] == hashlib.md5((project / "data/processed/train.jsonl").read_bytes()).hexdigest()
    assert tags["base_model"] == "builtin-tiny"
    assert len(tags["adapter_base_sha256"]) == 64
    assert len(tags["params_hash"]) == 16
    assert float(tags["metric.tuned_accuracy"]) == pytest.approx(metrics["tuned_accuracy"], abs=1e-5)
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert tags["adapter_dvc_md5"] == lock["stages"]["sft"]["outs"][0]["md5"]
    assert {f"dvc.{s}" for s in ("sample_data", "base", "validate", "dapt", "sft", "evaluate")} <= set(tags)
    assert json.loads(tags["params_json"])["sft"]["quantization"] == tags["sft.quantization"] == "nf4"
    assert len(tags["chat_template_sha256"]) == 64
    assert {"lib.torch", "lib.transformers", "lib.peft", "lib.trl", "lib.bitsandbytes"} <= set(tags)
    assert "beats base" in tags["promotion"]
    run = client.get_run(version.run_id)
    assert run.data.tags["stage"] == "register"
    parent_id = run.data.tags["mlflow.parentRunId"]
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert {c.data.tags["stage"] for c in children} == {"validate", "dapt", "sft", "evaluate", "register"}
    sft_run = next(c for c in children if c.data.tags["stage"] == "sft")
    history = client.get_metric_history(sft_run.info.run_id, "train_loss")
    assert len(history) >= 10 and history[-1].value < history[0].value
    assert "plots" in {a.path for a in client.list_artifacts(sft_run.info.run_id)}
    validate_run = next(c for c in children if c.data.tags["stage"] == "validate")
    assert any(a.path == "validation_report" for a in client.list_artifacts(validate_run.info.run_id))


def test_registered_adapter_stores_no_base_weights(pipeline_run, client):
    import mlflow

    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}/{version.version}"))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert "peft/adapter_model.safetensors" in files, files
    assert not any(f.endswith("model.safetensors") and not f.endswith("adapter_model.safetensors") for f in files), files


def test_make_ui_serves_the_run_and_the_champion(pipeline_run):
    """`make ui` over this run's store (a real MLflow server on 127.0.0.1, stopped here)."""
    root = Path(pipeline_run["uri"].removeprefix("sqlite:///")).parent
    with mlflow_ui(root, cwd=pipeline_run["project"]) as base:
        page = urllib.request.urlopen(f"{base}/", timeout=10).read().decode()
        assert "<html" in page.lower()
        alias = json.load(urllib.request.urlopen(
            f"{base}/api/2.0/mlflow/registered-models/alias?name={MODEL_NAME}&alias=champion", timeout=10))
        assert alias["model_version"]["version"] == "1"
        experiment = json.load(urllib.request.urlopen(
            f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=finetune-pipeline", timeout=10))
        assert experiment["experiment"]["name"] == "finetune-pipeline"


def run_module(project: Path, uri: str, module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=project, capture_output=True, text=True,
                          env=venv_env(MLFLOW_TRACKING_URI=uri))


def test_predict_from_champion_reproduces_the_evaluated_accuracy(pipeline_run, tmp_path):
    project = pipeline_run["project"]
    metrics = json.loads((project / "metrics/eval.json").read_text())
    out = tmp_path / "predictions.jsonl"
    proc = run_module(project, pipeline_run["uri"], "pipeline.predict", "--model-uri", f"models:/{MODEL_NAME}@champion",
                      "--input", "data/sample/eval.jsonl", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stderr.strip().splitlines()[-1])
    assert summary["accuracy"] == pytest.approx(metrics["tuned_accuracy"])
    evaluated = [json.loads(line) for line in (project / "reports/predictions.jsonl").read_text().splitlines()]
    predicted = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["prediction"] for p in predicted] == [e["tuned_prediction"] for e in evaluated]


def test_pyfunc_loads_the_champion_and_generates(pipeline_run, client):
    import mlflow

    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    out = model.predict(["지문을 읽고 질문의 답을 구하세요."])
    assert len(out) == 1 and isinstance(out[0], str)


def test_predict_refuses_an_unknown_version(pipeline_run):
    proc = run_module(pipeline_run["project"], pipeline_run["uri"], "pipeline.predict",
                      "--model-uri", f"models:/{MODEL_NAME}/99", "--input", "data/sample/eval.jsonl")
    assert proc.returncode == 2 and "not in the registry" in proc.stderr and "Traceback" not in proc.stderr


def test_merged_model_matches_base_plus_adapter(pipeline_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    project = pipeline_run["project"]
    proc = run_module(project, pipeline_run["uri"], "pipeline.merge", "--out", str(tmp_path / "merged"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "max abs logit difference" in proc.stdout
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(project / "models/dapt")
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)


def test_no_better_adapter_stays_challenger_and_rollback_restores(pipeline_run, client):
    project = pipeline_run["project"]
    # Evaluate again, now with a champion in the registry: it is scored on the same items in the same run,
    # and since it is this very adapter its numbers equal the tuned model's.
    proc = run_module(project, pipeline_run["uri"], "pipeline.evaluate")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((project / "metrics/eval.json").read_text())
    assert metrics["champion_version"] == 1
    assert metrics["champion_accuracy"] == metrics["tuned_accuracy"]
    assert metrics["champion_eos_rate"] == metrics["tuned_eos_rate"]
    assert "champion,{:.4f}".format(metrics["champion_accuracy"]) in (project / "plots/accuracy.csv").read_text()
    # Register the same adapter again: it does not beat the champion, so it must not take the alias.
    proc = run_module(project, pipeline_run["uri"], "pipeline.register")
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = client.get_model_version_by_alias(MODEL_NAME, "challenger")
    assert str(second.version) == "2" and "does not beat the champion" in second.tags["promotion"]
    assert str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == "1"
    # Promote it the way the register stage does, then roll back with the command.
    client.set_registered_model_alias(MODEL_NAME, "champion", "2")
    client.set_model_version_tag(MODEL_NAME, "2", "previous_champion", "1")
    proc = run_module(project, pipeline_run["uri"], "pipeline.rollback")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == "1"
    assert "moved back to version 1" in client.get_model_version(MODEL_NAME, "2").tags["rolled_back"]
    # Version 1 was the first champion: a second rollback has nowhere to go and says so.
    proc = run_module(project, pipeline_run["uri"], "pipeline.rollback")
    assert proc.returncode == 2 and "nothing to roll back to" in proc.stderr


def test_bad_data_stops_at_validate_and_touches_nothing(pipeline_run, client):
    project = pipeline_run["project"]
    adapter_hash = sha256(project / "models/adapter/adapter_model.safetensors")
    lock_before = yaml.safe_load((project / "dvc.lock").read_text())
    versions_before = {str(v.version) for v in client.search_model_versions(f"name = '{MODEL_NAME}'")}
    # A copy of the training data with one answer out of range, brought in as the user's data.
    rows = (project / "data/sample/train.jsonl").read_text(encoding="utf-8").splitlines()
    bad = json.loads(rows[6])
    bad["answer"] = 9
    rows[6] = json.dumps(bad, ensure_ascii=False)
    (project / "data/own").mkdir()
    (project / "data/own/train.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["train"] = {"path": "data/own/train.jsonl", "format": "mcq"}
    (project / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False))

    proc = dvc(project, "repro", check=False, MLFLOW_TRACKING_URI=pipeline_run["uri"])

    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "data/own/train.jsonl:7" in output and bad["id"] in output and "answer" in output, output[-3000:]
    assert "Running stage 'sft'" not in proc.stdout and "Running stage 'register'" not in proc.stdout
    assert sha256(project / "models/adapter/adapter_model.safetensors") == adapter_hash
    lock_after = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock_after["stages"]["sft"] == lock_before["stages"]["sft"]
    assert {str(v.version) for v in client.search_model_versions(f"name = '{MODEL_NAME}'")} == versions_before


def test_interactive_chat_streams_an_answer_from_the_champion(pipeline_run):
    project = pipeline_run["project"]
    item = json.loads((project / "data/sample/eval.jsonl").read_text(encoding="utf-8").splitlines()[0])
    from pipeline.formats import render_choices

    params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    question = params["task"]["user_template"].format(passage=item["passage"], question=item["question"],
                                                      choices=render_choices(item["choices"]))
    proc = subprocess.run([sys.executable, "-m", "pipeline.interactive", "--model-uri", f"models:/{MODEL_NAME}@champion",
                           "--max-new-tokens", "8"], cwd=project, env=venv_env(MLFLOW_TRACKING_URI=pipeline_run["uri"]),
                          capture_output=True, text=True, timeout=300, input=question.replace("\n", "\\n") + "\n\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "chat with models:/" in proc.stderr and "no stop token" not in proc.stderr  # stopped at the stop token
    answer = proc.stdout.strip()
    assert answer.isdigit() and 1 <= int(answer) <= len(item["choices"]), proc.stdout


def test_dvc_metrics_and_plots_diff_against_the_committed_run(pipeline_run, tmp_path):
    project = pipeline_run["project"]
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "pipeline outputs")
    metrics = json.loads((project / "metrics/eval.json").read_text())
    metrics["tuned_accuracy"] -= 0.1  # as if a later run did worse
    (project / "metrics/eval.json").write_text(json.dumps(metrics))
    try:
        diff = dvc(project, "metrics", "diff", "--md").stdout
        assert "tuned_accuracy" in diff and "-0.1" in diff
        dvc(project, "plots", "diff", "HEAD", "-o", str(tmp_path / "plots"))
        html = (tmp_path / "plots/index.html").read_text(encoding="utf-8")
        for plot in ("plots/sft_loss.csv", "plots/sft_eval_loss.csv", "plots/dapt_loss.csv", "plots/accuracy.csv"):
            assert plot in html, plot
    finally:
        git(project, "checkout", "metrics/eval.json")
