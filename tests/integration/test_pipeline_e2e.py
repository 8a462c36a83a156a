"""End to end: `dvc repro` of the default params in a fresh git repo, then what a user checks.

One full run (the shipped params, nothing shrunk; fixture `pipeline_run` in conftest.py) is shared by
these tests; the last test breaks the data and checks that nothing after `validate` runs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.helpers.project import MODEL_NAME, dvc, git, mlflow_ui, venv_env
from tests.helpers.readme import bare_env, readme_commands

# The MLflow UI in headless Chromium, on this module's pipeline run (tests/integration/ui_browser.py). Imported here so
# that `pytest -n 2 --dist loadfile` runs it in the same worker: the default pipeline runs once.
from tests.integration.ui_browser import test_ui_in_chromium_shows_the_pipeline_run_and_the_champion  # noqa: E402,F401
# The version as a REST endpoint (tests/integration/serving_endpoint.py), likewise on this module's pipeline run.
from tests.integration.serving_endpoint import (  # noqa: E402,F401
    endpoint,
    test_a_chat_request_gets_a_generation,
    test_a_malformed_request_gets_a_clear_400_without_a_traceback,
    test_mcq_requests_answer_as_predict_does_one_and_a_batch,
    test_the_version_carries_its_signature_and_input_example,
)
# The champion exported as GGUF and for vLLM (tests/integration/export_gguf.py), on this module's pipeline run.
from tests.integration.export_gguf import (  # noqa: E402,F401
    q8_export,
    test_a_q8_0_export_is_verified_in_llama_cpp_and_logged_to_the_version,
    test_an_export_that_fails_verification_is_refused_and_leaves_nothing,
    test_the_gguf_carries_the_chat_template_and_weights_close_to_the_merged_model,
    test_the_vllm_export_holds_the_adapter_the_base_and_the_exact_command,
)

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
    # The catalog the params check uses (gate and guards) is exactly what evaluate reports for an mcq eval set.
    from pipeline.metric_catalog import EVAL_METRICS, PAIRED_STATS, paired_key

    reported = {k for k in metrics if k.startswith("tuned_") and not k.startswith(("tuned_accuracy_", "tuned_vs_"))}
    assert reported - {"tuned_general_ppl_change"} == {f"tuned_{m}" for m in EVAL_METRICS["mcq"]
                                                               if m != "float32_changed_choices"}, reported  # float32 here
    # Paired on the same items: the counts are the predictions' own, the interval holds the difference.
    assert {paired_key("tuned", "base", s) for s in PAIRED_STATS} <= set(metrics)
    wins = sum(p["tuned_prediction"] == p["answer"] != p["base_prediction"] for p in preds)
    losses = sum(p["base_prediction"] == p["answer"] != p["tuned_prediction"] for p in preds)
    assert (metrics["tuned_vs_base_wins"], metrics["tuned_vs_base_losses"]) == (wins, losses)
    assert metrics["tuned_vs_base_acc_diff"] == pytest.approx(metrics["tuned_accuracy"] - metrics["base_accuracy"])
    assert metrics["tuned_vs_base_acc_diff_ci95_low"] <= metrics["tuned_vs_base_acc_diff"] \
        <= metrics["tuned_vs_base_acc_diff_ci95_high"]
    # Robustness: accuracy on the perturbed copies (all 150 items of each kind changed), inside its own interval.
    assert 0.0 <= metrics["tuned_robust_acc_ci95_low"] <= metrics["tuned_robust_accuracy"] \
        <= metrics["tuned_robust_acc_ci95_high"] <= 1.0, metrics
    assert metrics["robustness_drop"] == pytest.approx(metrics["tuned_robust_clean_accuracy"]
                                                       - metrics["tuned_robust_accuracy"])
    assert metrics["tuned_robust_clean_accuracy"] == pytest.approx(metrics["tuned_accuracy"])  # every item has 3 copies
    assert {metrics[f"robust_n_items_{k}"] for k in ("shuffle_choices", "typos", "distractor")} == {metrics["n_items"]}
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
    adapter_out = next(o for o in lock["stages"]["sft"]["outs"] if o["path"] == "models/adapter")
    assert tags["adapter_dvc_md5"] == adapter_out["md5"]
    assert {f"dvc.{s}" for s in ("sample_data", "base", "validate", "dapt", "sft", "evaluate")} <= set(tags)
    assert json.loads(tags["params_json"])["sft"]["quantization"] == tags["sft.quantization"] == "nf4"
    assert len(tags["chat_template_sha256"]) == 64
    assert {"lib.torch", "lib.transformers", "lib.peft", "lib.trl", "lib.bitsandbytes"} <= set(tags)
    assert "beats base" in tags["promotion"] and "champion numbers: none (no champion)" in tags["promotion"]
    assert tags["adapter_sha256"] == sha256(project / "models/adapter/adapter_model.safetensors")
    assert tags["adapter_base_uri"].startswith("runs:/") and tags["adapter_base_revision"] == "None"
    assert tags["pipeline_run_key"] == "e2e-first-run"
    assert tags["machine_class"] and {"machine.cpu_capability", "machine.torch", "machine.cuda"} <= set(tags)
    assert tags["git_dirty"] == "False"
    run = client.get_run(version.run_id)
    assert run.data.tags["stage"] == "register"
    parent_id = run.data.tags["mlflow.parentRunId"]
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert {c.data.tags["stage"] for c in children} == {"validate", "dapt", "sft", "evaluate", "register"}
    keyed = client.search_runs([run.info.experiment_id], "tags.pipeline_run_key = 'e2e-first-run'")
    assert [r.info.run_id for r in keyed] == [parent_id]  # only the pipeline's run: the parent search finds it
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


def test_registered_version_carries_its_model_card(pipeline_run, client, tmp_path):
    """README.md beside the adapter (and in place of peft's template card), the description, the register run's
    artifact and reports/model_card.md are one card; its plain-peft snippet loads the version as written."""
    import mlflow
    from pipeline.registry.model_card import CARD_TAG, DESCRIPTION_LIMIT

    project = pipeline_run["project"]
    card = (project / "reports/model_card.md").read_text(encoding="utf-8")
    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}/{version.version}", dst_path=str(tmp_path / "v")))
    assert (local / "README.md").read_text(encoding="utf-8") == card
    assert (local / "peft/README.md").read_text(encoding="utf-8") == card
    assert len(card) <= DESCRIPTION_LIMIT and version.description == card
    assert version.tags[CARD_TAG] == hashlib.sha256(card.encode()).hexdigest()
    assert "model_card.md" in {a.path for a in client.list_artifacts(version.run_id)}
    logged = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="model_card.md",
                                                 dst_path=str(tmp_path / "run"))
    assert Path(logged).read_text(encoding="utf-8") == card
    # What it says is this version's: data md5s, base, the gate's reason, the tuned accuracy and its interval.
    metrics = json.loads((project / "metrics/eval.json").read_text())
    for split in ("train", "validation", "eval"):
        assert hashlib.md5((project / f"data/processed/{split}.jsonl").read_bytes()).hexdigest() in card
    assert f"# {MODEL_NAME}, version {version.version}" in card and "- Base: `builtin-tiny`" in card
    assert f"- Decision: {version.tags['promotion']}" in card
    assert (f"{metrics['tuned_accuracy']:.3f} [{metrics['tuned_acc_ci95_low']:.3f}, "
            f"{metrics['tuned_acc_ci95_high']:.3f}]") in card
    # The sft stage's own output is untouched: models/adapter keeps peft's README.md.
    assert (project / "models/adapter/README.md").read_text(encoding="utf-8") != card
    # The card's plain-peft snippet, run as written against this registry.
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    check = "\nprint(isinstance(model, PeftModel), any('lora' in n for n, _ in model.named_parameters()))\n"
    proc = subprocess.run([sys.executable, "-c", snippet + check], cwd=tmp_path, capture_output=True, text=True,
                          env=venv_env(MLFLOW_TRACKING_URI=pipeline_run["uri"], HF_HUB_OFFLINE="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "True True", proc.stdout


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
    proc = run_module(project, pipeline_run["uri"], "pipeline.commands.predict", "--model-uri", f"models:/{MODEL_NAME}@champion",
                      "--input", "data/sample/eval.jsonl", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stderr.strip().splitlines()[-1])
    assert summary["accuracy"] == pytest.approx(metrics["tuned_accuracy"])
    evaluated = [json.loads(line) for line in (project / "reports/predictions.jsonl").read_text().splitlines()]
    predicted = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["prediction"] for p in predicted] == [e["tuned_prediction"] for e in evaluated]


def test_pyfunc_loads_the_champion_and_generates(pipeline_run, client):
    """MLflow's own loader (what `mlflow models serve` calls) on the champion: the item's chat gets the answer."""
    import mlflow
    from pipeline.data.formats import prompt_of, read_examples

    project = pipeline_run["project"]
    example = read_examples(project / "data/processed", "eval")[0]
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    out = model.predict([{"messages": prompt_of(example)}], params={"max_new_tokens": 4})
    assert len(out) == 1 and isinstance(out[0]["generation"], str)
    answer = out[0]["generation"]
    assert answer[:1].isdigit() and 1 <= int(answer[:1]) <= len(example.choices), out


def test_predict_refuses_an_unknown_version(pipeline_run):
    proc = run_module(pipeline_run["project"], pipeline_run["uri"], "pipeline.commands.predict",
                      "--model-uri", f"models:/{MODEL_NAME}/99", "--input", "data/sample/eval.jsonl")
    assert proc.returncode == 2 and "not in the registry" in proc.stderr and "Traceback" not in proc.stderr


def test_register_again_adopts_the_version_and_a_retry_finishes_an_interrupted_one(pipeline_run, client):
    project = pipeline_run["project"]
    # Evaluate again, now with a champion in the registry: it is scored on the same items in the same run,
    # and since it is this very adapter its numbers equal the tuned model's.
    proc = run_module(project, pipeline_run["uri"], "pipeline.stages.evaluate")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((project / "metrics/eval.json").read_text())
    assert metrics["champion_version"] == 1
    assert metrics["champion_accuracy"] == metrics["tuned_accuracy"]
    assert metrics["champion_eos_rate"] == metrics["tuned_eos_rate"]
    assert metrics["champion_robust_accuracy"] == metrics["tuned_robust_accuracy"]  # the same perturbed items
    assert "champion,{:.4f}".format(metrics["champion_accuracy"]) in (project / "plots/accuracy.csv").read_text()
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    scored = json.loads((project / "reports/champion.json").read_text())
    assert scored["scored"] and scored["version"] == "1"
    assert scored["adapter_sha256"] == champion.tags["adapter_sha256"] == sha256(
        project / "models/adapter/adapter_model.safetensors")

    def versions() -> list[str]:
        return sorted(str(v.version) for v in client.search_model_versions(f"name = '{MODEL_NAME}'"))

    import mlflow
    from pipeline.registry.model_card import CARD_TAG

    def readme() -> str:
        return Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}/1/README.md")).read_text(encoding="utf-8")

    card = readme()
    # A rerun (or a Prefect retry) of register with the same adapter adopts version 1: no duplicate, and the
    # version keeps its card (a rebuilt one would now show the champion column: evaluate scored a champion).
    proc = run_module(project, pipeline_run["uri"], "pipeline.stages.register")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already version 1; adopting it" in proc.stdout, proc.stdout
    assert "keeping the model card of version 1" in proc.stdout, proc.stdout
    assert versions() == ["1"]
    assert readme() == card == client.get_model_version(MODEL_NAME, "1").description
    assert (project / "reports/model_card.md").read_text(encoding="utf-8") == card and "`champion`: version" not in card
    # A registration interrupted after the version was made, before the gate ran (so before its card: no tag,
    # no description, no README.md beside the adapter): the retry finishes it.
    client.delete_model_version_tag(MODEL_NAME, "1", "promotion")
    client.delete_model_version_tag(MODEL_NAME, "1", CARD_TAG)
    client.update_model_version(MODEL_NAME, "1", description="")
    logged = client.get_logged_model(client.get_model_version(MODEL_NAME, "1").source.removeprefix("models:/"))
    (Path(urllib.parse.urlparse(logged.artifact_location).path) / "README.md").unlink()
    proc = run_module(project, pipeline_run["uri"], "pipeline.stages.register")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model card attached to version 1" in proc.stdout, proc.stdout
    assert versions() == ["1"]
    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(version.version) == "1" and "already the champion" in version.tags["promotion"]
    assert json.loads((project / "reports/registry.json").read_text())["alias"] == "champion"
    card = (project / "reports/model_card.md").read_text(encoding="utf-8")
    assert readme() == card == version.description and f"- Decision: {version.tags['promotion']}" in card
    assert version.tags[CARD_TAG] == hashlib.sha256(card.encode()).hexdigest()


def test_the_registered_base_outlives_a_later_dapt_run_and_prompts_follow_the_version(pipeline_run, client, tmp_path):
    """Register, change DAPT params and rerun DAPT (models/dapt is overwritten), change the checkout's task
    prompt, then predict from the old champion: it loads its own base artifact and renders items with its own
    task params, so it reproduces exactly the predictions the evaluate stage made."""
    project = pipeline_run["project"]
    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert version.tags["adapter_base_uri"].startswith("runs:/"), version.tags["adapter_base_uri"]
    saved = tmp_path / "saved"
    shutil.copytree(project / "models/dapt", saved / "dapt")
    for name in ("dvc.lock", "params.yaml", "plots/dapt_loss.csv"):
        (saved / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(project / name, saved / name)
    dapt_before = sha256(project / "models/dapt/model.safetensors")
    status_before = dvc(project, "status", MLFLOW_TRACKING_URI=pipeline_run["uri"]).stdout
    try:
        params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
        params["dapt"]["max_steps"] = 20
        params["task"]["system_prompt"] = "다음 글을 읽고 답하세요."
        (project / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False))
        dvc(project, "repro", "--single-item", "dapt", MLFLOW_TRACKING_URI=pipeline_run["uri"])
        assert sha256(project / "models/dapt/model.safetensors") != dapt_before
        out = tmp_path / "predictions.jsonl"
        proc = run_module(project, pipeline_run["uri"], "pipeline.commands.predict", "--model-uri",
                          f"models:/{MODEL_NAME}@champion", "--input", "data/sample/eval.jsonl", "--output", str(out))
        assert proc.returncode == 0, proc.stderr[-3000:]
        evaluated = [json.loads(line) for line in (project / "reports/predictions.jsonl").read_text().splitlines()]
        assert [json.loads(line)["prediction"] for line in out.read_text().splitlines()] == \
            [e["tuned_prediction"] for e in evaluated]
    finally:
        shutil.rmtree(project / "models/dapt")
        shutil.copytree(saved / "dapt", project / "models/dapt")
        for name in ("dvc.lock", "params.yaml", "plots/dapt_loss.csv"):
            shutil.copy2(saved / name, project / name)
    assert dvc(project, "status", MLFLOW_TRACKING_URI=pipeline_run["uri"]).stdout == status_before


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
    git(project, "checkout", "params.yaml")  # the user's data goes; the later tests use the shipped params
    shutil.rmtree(project / "data/own")


def test_interactive_chat_streams_an_answer_from_the_champion(pipeline_run):
    project = pipeline_run["project"]
    item = json.loads((project / "data/sample/eval.jsonl").read_text(encoding="utf-8").splitlines()[0])
    from pipeline.data.formats import render_choices

    params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    question = params["task"]["user_template"].format(passage=item["passage"], question=item["question"],
                                                      choices=render_choices(item["choices"]))
    proc = subprocess.run([sys.executable, "-m", "pipeline.commands.chat", "--model-uri", f"models:/{MODEL_NAME}@champion",
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


def test_readme_commands_run_as_written_without_the_venv_on_path(pipeline_run, client, tmp_path):
    """Each command parsed from README.md, typed as written in the project (whose .venv is the venv these tests
    run in), with a PATH that has no venv on it: the stages run through bin/stage, not the system python.
    `reproduce` re-creates the whole pipeline in a worktree (minutes): it runs in the extended tier
    (tests/stages/test_validate_bad_inputs.py), parsed from the README the same way."""
    project = pipeline_run["project"]
    venv = Path(sys.prefix)
    assert str(venv) not in bare_env("")["PATH"]
    (project / ".venv").symlink_to(venv, target_is_directory=True)
    shutil.copytree(project, tmp_path / "before-experiment", symlinks=True)  # for the concurrent registrations
    pipeline_run["before_experiment"] = tmp_path / "before-experiment"
    commands = readme_commands()
    assert [c.split()[1] if c.startswith(".venv/bin/dvc") else c.split()[2] for c in commands] == \
        ["exp", "exp", "metrics", *(f"pipeline.commands.{m}" for m in ("predict", "chat", "merge", "rollback")),
         "pipeline.export", "pipeline.commands.reproduce"], commands
    results = {}
    for command in commands:
        if "pipeline.commands.reproduce" in command:
            continue
        stdin = "지문을 읽고 답하세요\n\n" if "pipeline.commands.chat" in command else ""
        proc = subprocess.run(["bash", "-c", command], cwd=project, env=bare_env(pipeline_run["uri"]), input=stdin,
                              capture_output=True, text=True, timeout=900)
        results[command.split()[2] if command.startswith(".venv/bin/python") else " ".join(command.split()[:3])] = proc
        output = proc.stdout + proc.stderr
        assert "ModuleNotFoundError" not in output and "Traceback" not in output, (command, output[-3000:])
        if "pipeline.commands.rollback" in command:
            # Rolling back needs a previous champion: there is one only if the experiment was promoted.
            promoted = "previous_champion" in client.get_model_version_by_alias(MODEL_NAME, "champion").tags
            assert proc.returncode == (0 if promoted else 2), (command, output[-3000:])
            assert ("moved from version" if promoted else "nothing to roll back to") in output, output[-3000:]
            continue
        assert proc.returncode == 0, (command, output[-3000:])
    assert "Running stage 'sft'" in results[".venv/bin/dvc exp run"].stdout
    experiment = client.get_model_version(MODEL_NAME, "2")  # the experiment's adapter, registered by its run
    assert json.loads(experiment.tags["params_json"])["sft"]["max_steps"] != 200
    assert experiment.tags["git_dirty"] == "True"  # `-S` edits params.yaml: the commit alone does not describe it
    assert "champion numbers: version 1 re-scored in this run" in experiment.tags["promotion"], experiment.tags
    assert "max_steps" in results[".venv/bin/dvc exp show"].stdout
    assert "metrics/eval.json" in results[".venv/bin/dvc metrics diff"].stdout  # the experiment changed its metrics
    assert len((project / "preds.jsonl").read_text().splitlines()) == 150
    assert "chat with models:/" in results["pipeline.commands.chat"].stderr
    # merge: a plain model directory whose weights carry the adapter, checked against base+adapter logits.
    import torch
    from transformers import AutoModelForCausalLM

    assert "max abs logit difference" in results["pipeline.commands.merge"].stdout
    merged = AutoModelForCausalLM.from_pretrained(project / "models/merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(project / "models/dapt")
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    # export: the champion as an f16 GGUF that llama.cpp answered like the merged model, logged to the version.
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    out = project / "exports" / f"{MODEL_NAME}-v{champion.version}-gguf-f16"
    report = json.loads((out / "export.json").read_text())
    assert report["agreement"] >= 0.99 and report["prompts_tokenized_alike"] == report["n_items"] == 150
    assert champion.tags["export.gguf.f16.sha256"] == report["sha256"] == sha256(out / "model-f16.gguf")
    assert (out / "Modelfile").read_text().startswith("FROM ./model-f16.gguf\n")


def test_two_concurrent_registrations_are_decided_one_after_the_other(pipeline_run, tmp_path):
    """Two real `register` processes at the same moment against one fresh registry: the first-trained adapter
    (200 steps, the checkout before the README's experiment) and the experiment's. The registry lock serialises
    them, so the second decision sees the first: the champion is what the gate gives in registration order (it
    is replayed here from the registered metrics), and a second version promoted over the first names it as
    previous_champion (without the lock both would see "no champion yet")."""
    from mlflow import MlflowClient

    dirs = [pipeline_run["before_experiment"], pipeline_run["project"]]
    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline.stages.register"], cwd=d, env=venv_env(MLFLOW_TRACKING_URI=uri),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for d in dirs]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outputs]
    client = MlflowClient(uri)
    versions = {str(v.version): client.get_model_version(MODEL_NAME, v.version)
                for v in client.search_model_versions(f"name = '{MODEL_NAME}'")}
    assert sorted(versions) == ["1", "2"] and all("promotion" in v.tags for v in versions.values())
    # Replay the gate in registration order (version numbers follow the lock): what the registry must show.
    from pipeline.config import load_params
    from pipeline.registry.gate import promotion_decision

    params = load_params(dirs[0] / "params.yaml")  # the register section is the same in both checkouts
    metrics = {n: {k.removeprefix("metric."): float(t) for k, t in v.tags.items() if k.startswith("metric.")}
               for n, v in versions.items()}
    first, _ = promotion_decision(params, metrics["1"], None)
    second, _ = promotion_decision(params, metrics["2"], metrics["1"] if first else None)
    expected = "2" if second else "1" if first else None
    assert expected is not None, "neither adapter beats the base: the test cannot tell the lock's effect"
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(champion.version) == expected, (metrics, {n: v.tags["promotion"] for n, v in versions.items()})
    if second and first:  # the second decision saw the first champion: without the lock it would not have
        assert champion.tags["previous_champion"] == "1", champion.tags
        assert "champion numbers: registered tags of version 1" in champion.tags["promotion"]
        proc = subprocess.run([sys.executable, "-m", "pipeline.commands.rollback"], cwd=dirs[0], capture_output=True,
                              text=True, env=venv_env(MLFLOW_TRACKING_URI=uri))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == "1"
        assert "moved back to version 1" in client.get_model_version(MODEL_NAME, "2").tags["rolled_back"]
    elif first:
        assert "champion numbers: registered tags of version 1" in versions["2"].tags["promotion"] or \
            "re-scored" in versions["2"].tags["promotion"], versions["2"].tags["promotion"]
        assert "previous_champion" not in versions["2"].tags
