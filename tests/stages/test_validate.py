"""Stage `validate`: the real Great Expectations gate on generated sample data, a tiny base's tokenizer and
chat template, and broken copies of the data. (Every malformed-file case lives in tests/bad_inputs.)"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from html import unescape
from pathlib import Path

import pytest
import yaml

from pipeline.config import Params
from pipeline.data.validation import validate_datasets, write_processed
from tests.helpers.project import TINY_SAMPLE as N

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sample(tmp_path_factory, tiny_world) -> Path:
    """Small generated datasets and a tiny base (its tokenizer and chat template): the shared ones, linked."""
    return tiny_world.link_into(tmp_path_factory.mktemp("sample"))


def params_for(root: Path, **sections) -> Params:
    """The repo's params with `data` and `base` pointed into root, plus section overrides (dicts, merged)."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    raw["data"] = {"train": {"path": str(root / "data/train.jsonl"), "format": "mcq"},
                   "validation": {"path": str(root / "data/validation.jsonl"), "format": "mcq"},
                   "eval": {"path": str(root / "data/eval.jsonl"), "format": "mcq"},
                   "domain_corpus": {"path": str(root / "data/domain_train.txt"), "format": "text"},
                   "domain_eval": {"path": str(root / "data/domain_eval.txt"), "format": "text"},
                   "general_eval": {"path": str(root / "data/general_eval.txt"), "format": "text"}}
    raw["base"]["out_dir"] = str(root / "base")
    for section, values in sections.items():
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(raw[section].get(key), dict):
                raw[section][key] = {**raw[section][key], **value}
            else:
                raw[section][key] = value
    return Params.model_validate(raw)


@pytest.fixture
def root(sample, tmp_path) -> Path:
    """A fresh copy of the sample data (the test may break it) beside the shared tiny base."""
    shutil.copytree(sample / "data", tmp_path / "data")
    (tmp_path / "base").symlink_to(sample / "base")
    return tmp_path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write(path: Path, items: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items), encoding="utf-8")


def test_good_data_passes_and_data_docs_list_every_expectation(root):
    outcome, splits = validate_datasets(params_for(root), root / "report")
    assert outcome.success, outcome.violations
    assert outcome.rows == {"train": N["n_train"], "validation": N["n_validation"], "eval": N["n_eval"],
                            "domain_corpus": N["n_domain_lines"], "domain_eval": N["n_heldout_lines"],
                            "general_eval": N["n_heldout_lines"]}
    by_dataset: dict[str, list[dict]] = {}
    for check in outcome.checks:
        by_dataset.setdefault(check["dataset"], []).append(check)
    assert {c["rule"] for c in by_dataset["eval"]} >= {"required", "type", "choices_count", "answer_in_range",
                                                       "max_length", "trainable_tokens", "stop_token", "leakage",
                                                       "duplicate_exact", "pii"}
    # Data Docs: one validation page per dataset, every expectation rendered (by its description) with a
    # success mark; the index links them all.
    assert (root / "report/index.html").is_file()
    for name, checks in by_dataset.items():
        [page] = (root / "report/validations").glob(f"{name}_*/**/*.html")
        html = page.read_text(encoding="utf-8")
        text = unescape(re.sub(r"<[^>]+>", "", html))
        for check in checks:
            assert check["description"] in text, (name, check)
        assert html.count("fa-check-circle text-success") >= len(checks)
        assert "text-danger" not in html
    s = outcome.stats["train"]
    assert s["tokens"]["min"] <= s["tokens"]["median"] <= s["tokens"]["p95"] <= s["tokens"]["max"] <= 256
    assert 0 < s["trainable_share"] < 0.1  # the answer and its end token, out of ~100 tokens


def test_label_audit_shows_the_trained_tokens(root):
    outcome, _ = validate_datasets(params_for(root), root / "report")
    audit = (root / "report/label_audit.md").read_text(encoding="utf-8")
    first = rows(root / "data/train.jsonl")[0]
    assert f"⟦{first['answer']}<|eot_id|>⟧" in audit  # only the answer and the end-of-turn token
    assert audit.count("\n### ") == 9 and outcome.fingerprint in audit  # 3 examples per chat dataset


def test_label_audit_fails_a_template_that_masks_everything(root):
    # A template that never renders the assistant's answer: nothing would be learned.
    template = root / "drops_answers.jinja"
    template.write_text("{{ bos_token }}{% for m in messages %}{% if m.role != 'assistant' %}{{ m.content }}"
                        "{{ eos_token }}{% endif %}{% endfor %}", encoding="utf-8")
    outcome, _ = validate_datasets(params_for(root, task={"chat_template": str(template)}), root / "report")
    assert not outcome.success
    rules = {v["rule"] for v in outcome.violations}
    assert rules == {"trainable_tokens"}
    every = N["n_train"] + N["n_validation"] + N["n_eval"]
    assert sum(v["rule"] == "trainable_tokens" for v in outcome.violations) == every  # every example of the splits
    assert outcome.violations[0]["message"].endswith(
        "trainable_tokens on labels: no trainable token after templating and masking: the loss would ignore this example")


def test_an_answer_without_a_stop_token_fails_the_audit(root):
    template = root / "no_eos.jinja"  # renders answers but never an end-of-turn or EOS after them
    template.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant: {% endif %}", encoding="utf-8")
    outcome, _ = validate_datasets(params_for(root, task={"chat_template": str(template)}), root / "report")
    assert {v["rule"] for v in outcome.violations} == {"stop_token"}
    assert "not a stop token (<|eot_id|>): the model would not learn to stop" in outcome.violations[0]["message"]


def test_severity_warn_reports_without_stopping(root):
    train = root / "data/train.jsonl"
    items = rows(train)
    # Only case and whitespace differ (Hangul has no case: the spacing makes it a normalised duplicate).
    copy = dict(items[3], id="copy-of-4", passage="  " + items[3]["passage"].upper().replace(" ", "   "))
    write(train, items + [copy])
    failed, _ = validate_datasets(params_for(root, validate={"severity": {"duplicate_normalised": "error"}}),
                                  root / "r1")
    assert [v["rule"] for v in failed.violations] == ["duplicate_normalised", "duplicate_normalised"]
    warned, _ = validate_datasets(params_for(root), root / "r2")  # default: warn
    assert warned.success and [w["rule"] for w in warned.warnings] == ["duplicate_normalised"] * 2
    assert f"{train}:{N['n_train'] + 1} (id copy-of-4): duplicate_normalised on record" in warned.warnings[1]["message"]


def test_overlong_examples_stop_or_are_dropped(root, tmp_path):
    passed, _ = validate_datasets(params_for(root), root / "r0")
    limit = int(passed.stats["train"]["tokens"]["median"])  # about half the examples are longer
    stopped, _ = validate_datasets(params_for(root, sft={"max_length": limit}), root / "r1")
    assert not stopped.success and {v["rule"] for v in stopped.violations} == {"max_length"}
    assert re.search(rf"train\.jsonl:\d+ \(id mcq-\d+\): max_length on tokens: \d+ tokens > sft.max_length={limit}",
                     stopped.violations[0]["message"])
    params = params_for(root, sft={"max_length": limit}, validate={"overlong": "drop"})
    dropped, splits = validate_datasets(params, root / "r2")
    assert dropped.success and not dropped.violations
    assert {w["rule"] for w in dropped.warnings} == {"max_length"}
    n_dropped = len(dropped.dropped["train"])
    assert 0 < n_dropped < N["n_train"]
    write_processed(splits, params, dropped, tmp_path / "processed")
    manifest = json.loads((tmp_path / "processed/manifest.json").read_text(encoding="utf-8"))
    assert manifest["rows"]["train"] == N["n_train"] - n_dropped and manifest["dropped"]["train"] == dropped.dropped["train"]
    assert len((tmp_path / "processed/train.jsonl").read_text(encoding="utf-8").splitlines()) == N["n_train"] - n_dropped


def test_a_record_that_grows_in_normalisation_is_still_read_downstream(root, tmp_path):
    """An MCQ line just under validate.max_record_bytes becomes a longer chat line (system prompt, template,
    choices twice); the manifest records the longest processed line, so the later stages' readers, given the
    same params, accept it rather than refusing data the gate passed."""
    from pipeline.data.formats import read_examples

    train = root / "data/train.jsonl"
    items = rows(train)
    pad = 990 - len((json.dumps(items[0], ensure_ascii=False) + "\n").encode())
    items[0] = dict(items[0], passage=items[0]["passage"] + " " + "x" * (pad - 1))
    write(train, items)
    assert len(train.read_bytes().splitlines(keepends=True)[0]) == 990
    params = params_for(root, validate={"max_record_bytes": 1000}, sft={"max_length": 4096})
    outcome, splits = validate_datasets(params, tmp_path / "report")
    assert outcome.success, outcome.violations[:3]
    write_processed(splits, params, outcome, tmp_path / "processed")
    manifest = json.loads((tmp_path / "processed/manifest.json").read_text(encoding="utf-8"))
    assert manifest["max_line_bytes"]["train"] > 1000  # the processed line outgrew the limit
    examples = read_examples(tmp_path / "processed", "train", params.validation.max_record_bytes)
    assert len(examples) == N["n_train"] and "x" * 100 in examples[0].messages[1]["content"]


def test_an_eval_item_copied_into_train_is_leakage(root):
    train, eval_ = root / "data/train.jsonl", root / "data/eval.jsonl"
    train_rows, eval_rows = rows(train), rows(eval_)
    # Case and whitespace changes do not hide a copy: the rule compares normalised text.
    copied = dict(eval_rows[2], id="copied-1", passage="  " + eval_rows[2]["passage"].upper().replace(" ", "   "))
    write(train, train_rows + [copied])
    outcome, _ = validate_datasets(params_for(root), root / "report")
    assert [v["message"] for v in outcome.violations] == [
        f"{eval_}:3 (id {eval_rows[2]['id']}): leakage on prompt: the prompt also appears in train at "
        f"{train}:{N['n_train'] + 1} (id copied-1)"]


def test_a_validation_item_seen_in_train_or_eval_is_leakage(root):
    validation, train, eval_ = (root / f"data/{name}.jsonl" for name in ("validation", "train", "eval"))
    train_rows, eval_rows = rows(train), rows(eval_)
    write(validation, rows(validation) + [dict(eval_rows[4], id="from-eval"), dict(train_rows[7], id="from-train")])
    outcome, _ = validate_datasets(params_for(root), root / "report")
    assert [v["message"] for v in outcome.violations] == [
        f"{validation}:{N['n_validation'] + 2} (id from-train): leakage on prompt: the prompt also appears in train at "
        f"{train}:8 (id {train_rows[7]['id']})",
        f"{validation}:{N['n_validation'] + 1} (id from-eval): leakage on prompt: the prompt also appears in eval at "
        f"{eval_}:5 (id {eval_rows[4]['id']})"]


CARVE = """
import json, sys
from pipeline.modeling.chat_template import chat_tokenizer
from pipeline.data.splits import Split, carve_validation, prepare
from pipeline.config import Params
from pipeline.data.readers import read_records
params = Params.model_validate(json.loads(sys.argv[1]))
split = Split("train", params.data.train.path, "mcq", read_records(params.data.train.path))
prepare(split, params, chat_tokenizer(params.base.out_dir))
print(json.dumps([r.value["id"] for r in carve_validation(split, params.validation.validation_fraction)[1].records]))
"""


def test_without_a_validation_set_a_deterministic_disjoint_share_of_train_is_carved(root, tmp_path):
    train = root / "data/train.jsonl"
    original = rows(train)
    params = params_for(root, data={"validation": None})
    outcome, splits = validate_datasets(params, root / "r1")
    assert outcome.success, outcome.violations
    carved_n = round(0.1 * N["n_train"])  # validate.validation_fraction 0.1 of train
    assert outcome.rows["train"] == N["n_train"] - carved_n and outcome.rows["validation"] == carved_n
    write_processed(splits, params, outcome, tmp_path / "p1")
    kept = [r["id"] for r in rows(tmp_path / "p1/train.jsonl")]
    carved = [r["id"] for r in rows(tmp_path / "p1/validation.jsonl")]
    assert not set(kept) & set(carved) and sorted(kept + carved) == sorted(r["id"] for r in original)
    assert json.loads((tmp_path / "p1/manifest.json").read_text(encoding="utf-8"))["validation_carved_from_train"] == 0.1
    # Chosen by content, not position or hash seed: the same items from train in reverse order, when data.validation
    # names train's own path (the spelling dvc.yaml can interpolate), and in a process with another hash seed.
    write(train, original[::-1])
    same_path = params_for(root, data={"validation": {"path": str(train), "format": "mcq"}})
    again, splits = validate_datasets(same_path, root / "r2")
    assert again.success and sorted(r.value["id"] for r in splits[1].records) == sorted(carved)
    assert splits[1].name == "validation" and splits[1].records[0].where().startswith(f"{train}:")
    for seed in ("1", "2"):
        proc = subprocess.run([sys.executable, "-c", CARVE, json.dumps(params.model_dump(by_alias=True))],
                              env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert sorted(json.loads(proc.stdout.splitlines()[-1])) == sorted(carved), seed


def test_a_held_out_line_copied_from_the_corpus_fails_the_gate(root):
    corpus, held = root / "data/domain_train.txt", root / "data/domain_eval.txt"
    good, _ = validate_datasets(params_for(root), root / "r0")
    assert good.success and good.metrics()["domain_eval_corpus_line_share"] == 0.0
    share = good.metrics()["domain_eval_corpus_4gram_share"]
    assert 0 <= share < 1  # same templates, other facts (the small corpus here holds few of their 4-grams)
    assert good.metrics()["general_eval_corpus_4gram_share"] == 0.0
    lines = corpus.read_text(encoding="utf-8").splitlines()
    copy = lines[5]
    # Whitespace changes do not hide a copy: lines are compared normalised, as prompts are for leakage.
    held.write_text(held.read_text(encoding="utf-8") + "  " + copy.replace(" ", "   ") + "\n", encoding="utf-8")
    failed, _ = validate_datasets(params_for(root), root / "r1")
    assert [v["message"] for v in failed.violations] == [
        f"{held}:{N['n_heldout_lines'] + 1}: heldout_overlap on text: the line is also domain_corpus line {corpus}:{lines.index(copy) + 1}: "
        "perplexity on it measures memorisation, not the domain"]
    assert failed.metrics()["domain_eval_corpus_line_share"] == 1 / (N["n_heldout_lines"] + 1)
    assert failed.metrics()["domain_eval_corpus_4gram_share"] > share  # every gram of the copy is in the corpus
    warned, _ = validate_datasets(params_for(root, validate={"severity": {"heldout_overlap": "warn"}}), root / "r2")
    assert warned.success and [w["rule"] for w in warned.warnings] == ["heldout_overlap"]


def test_pii_is_a_warning_by_default(root):
    train = root / "data/train.jsonl"
    items = rows(train)
    items[4]["passage"] += " 연락처: kim@example.com, 010-1234-5678"
    write(train, items)
    outcome, _ = validate_datasets(params_for(root), root / "report")
    assert outcome.success
    assert [w["message"].split(": ", 2)[-1] for w in outcome.warnings] == [
        "contains an e-mail address: kim@example.com", "contains a phone number: 010-1234-5678"]


def run_entry_point(root: Path, mlflow_uri: str) -> subprocess.CompletedProcess:
    """`python -m pipeline.stages.validate` in root with a params.yaml pointing at root's data."""
    raw = params_for(root).model_dump(by_alias=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": mlflow_uri}
    return subprocess.run([sys.executable, "-m", "pipeline.stages.validate"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)


def test_entry_point_writes_processed_data_only_when_the_gate_passes(root, tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    proc = run_entry_point(root, uri)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"(\d+)/\1 expectations passed, 0 errors", proc.stdout)
    processed = {p.name: p.read_bytes() for p in (root / "data/processed").iterdir()}
    assert set(processed) == {"train.jsonl", "validation.jsonl", "eval.jsonl", "domain_corpus.jsonl",
                              "domain_eval.jsonl", "general_eval.jsonl", "manifest.json"}

    items = rows(root / "data/train.jsonl")
    items[16]["answer"] = 7
    write(root / "data/train.jsonl", items)
    proc = run_entry_point(root, uri)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (f"error: {root}/data/train.jsonl:17 (id {items[16]['id']}): answer_in_range on answer: "
            "answer 7 not in 1..5") in proc.stderr
    assert {p.name: p.read_bytes() for p in (root / "data/processed").iterdir()} == processed  # untouched
    assert json.loads((root / "metrics/validation.json").read_text(encoding="utf-8"))["success"] is False
    from mlflow import MlflowClient

    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("finetune-pipeline").experiment_id],
                                         filter_string="tags.stage = 'validate'")
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]
