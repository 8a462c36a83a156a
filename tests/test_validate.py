"""Stage `validate`: real Great Expectations on generated sample data and broken copies of it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import SampleDataParams
from pipeline.sample_data import generate
from pipeline.validate import validate_datasets

REPO = Path(__file__).resolve().parents[1]
NUM_CHOICES = 5


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> Path:
    """Small generated train/eval files (fast suites), made once per module."""
    out = tmp_path_factory.mktemp("sample")
    params = SampleDataParams(n_train=60, n_eval=20, n_domain_lines=1, n_heldout_lines=1,
                              type_mix={"explicit": 0.4, "ordinal": 0.3, "lookup": 0.3})
    generate(params, NUM_CHOICES, seed=0, out_dir=out)
    return out


@pytest.fixture
def data(sample_dir, tmp_path) -> tuple[Path, Path]:
    """A fresh copy of the sample train/eval files the test may break."""
    train, eval_ = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    shutil.copy(sample_dir / "train.jsonl", train)
    shutil.copy(sample_dir / "eval.jsonl", eval_)
    return train, eval_


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def run(train: Path, eval_: Path, tmp_path: Path):
    return validate_datasets(train, eval_, NUM_CHOICES, tmp_path / "report")


def test_good_sample_passes(data, tmp_path):
    outcome = run(*data, tmp_path)
    assert outcome.success, outcome.violations
    assert outcome.metrics() == {"train_rows": 60, "eval_rows": 20, "expectations": 35, "failed": 0,
                                 "violations": 0, "success": True}
    assert (tmp_path / "report" / "index.html").is_file()
    summary = json.loads((tmp_path / "report" / "summary.json").read_text(encoding="utf-8"))
    assert len(summary["checks"]) == 35 and all(c["success"] and c["unexpected_count"] == 0 for c in summary["checks"])
    assert {c["split"] for c in summary["checks"]} == {"train", "eval"}


def _set(line: int, key: str, value):
    def mutate(rows):
        rows[line - 1][key] = value
    return mutate


def _drop_choice(rows):
    rows[2]["choices"] = rows[2]["choices"][:4]


def _duplicate_id(rows):
    rows[5]["id"] = rows[4]["id"]


def _drop_question(rows):
    del rows[10]["question"]


def _blank_choice(rows):
    rows[7]["choices"][1] = " "


# (train mutation, line that must be named, rule, detail)
CONTENT_CASES = {
    "answer_out_of_range": (_set(17, "answer", 7), 17, "expect_column_values_to_be_between on answer",
                            "value 7 not in 1..5"),
    "answer_not_int": (_set(4, "answer", "3"), 4, "expect_column_values_to_be_in_set on answer", 'got string "3"'),
    "four_choices": (_drop_choice, 3, "expect_column_values_to_be_between on choices", "4 choices, expected 5"),
    "empty_choice": (_blank_choice, 8, "expect_column_values_to_be_between on choices", "non-empty string"),
    "duplicate_id": (_duplicate_id, 6, "expect_column_values_to_be_unique on id", "duplicate id, on lines 5, 6"),
    "null_passage": (_set(9, "passage", None), 9, "expect_column_values_to_not_be_null on passage", "value is null"),
    "empty_passage": (_set(10, "passage", "  \n "), 10, "expect_column_values_to_be_between on passage", "empty"),
    "missing_question": (_drop_question, 11, "expect_column_values_to_not_be_null on question", "field missing"),
}


@pytest.mark.parametrize("case", CONTENT_CASES)
def test_broken_train_fails_naming_file_line_id_and_rule(case, data, tmp_path):
    mutate, line, rule, detail = CONTENT_CASES[case]
    train, eval_ = data
    rows = records(train)
    mutate(rows)
    write(train, rows)
    outcome = run(train, eval_, tmp_path)
    assert not outcome.success
    messages = [v["message"] for v in outcome.violations]
    expected = f"{train}:{line} (id {rows[line - 1]['id']}): {rule}: "
    assert any(m.startswith(expected) and detail in m for m in messages), messages
    assert all(m.startswith(str(train)) for m in messages), messages  # nothing else is flagged
    assert outcome.metrics()["failed"] >= 1
    assert (tmp_path / "report" / "index.html").is_file()  # Data Docs show the failure too


def test_eval_item_copied_into_train_fails(data, tmp_path):
    train, eval_ = data
    train_rows, eval_rows = records(train), records(eval_)
    # Case and whitespace changes do not hide a copy: the rule compares normalised text.
    copied = dict(eval_rows[2], id="copied-1", passage="  " + eval_rows[2]["passage"].upper().replace(" ", "   "))
    write(train, train_rows + [copied])
    outcome = run(train, eval_, tmp_path)
    assert [v["message"] for v in outcome.violations] == [
        f"{eval_}:3 (id {eval_rows[2]['id']}): expect_column_values_to_not_be_in_set on passage+question: "
        f"normalised passage+question also in train at {train}:{len(train_rows) + 1} (id copied-1)"]


def _truncate_line_5(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[4] = lines[4][: len(lines[4]) // 2] + "\n"
    path.write_text("".join(lines), encoding="utf-8")


# (how to break train.jsonl, expected message after the file name)
FILE_CASES = {
    "truncated_json_line": (_truncate_line_5, ":5: not valid JSON"),
    "missing_file": (lambda p: p.unlink(), ": file not found"),
    "empty_file": (lambda p: p.write_text("\n\n", encoding="utf-8"), ": no records (empty file)"),
    "bad_utf8": (lambda p: p.write_bytes(p.read_bytes() + b'{"id": "\xff"}\n'), ":61: not valid UTF-8"),
    "not_an_object": (lambda p: p.write_text(p.read_text(encoding="utf-8") + "[1, 2]\n", encoding="utf-8"),
                      ":61: each line must be a JSON object"),
}


@pytest.mark.parametrize("case", FILE_CASES)
def test_malformed_file_fails_before_gx(case, data, tmp_path):
    breaker, expected = FILE_CASES[case]
    train, eval_ = data
    breaker(train)
    outcome = run(train, eval_, tmp_path)
    assert not outcome.success and outcome.checks == []  # caught by read_jsonl, no suite ran
    assert [v["message"] for v in outcome.violations][0].startswith(f"{train}{expected}")
    assert json.loads((tmp_path / "report" / "summary.json").read_text(encoding="utf-8"))["success"] is False


def test_both_unreadable_files_are_reported(tmp_path):
    outcome = run(tmp_path / "no_train.jsonl", tmp_path / "no_eval.jsonl", tmp_path)
    files = [v["file"] for v in outcome.violations]
    assert files == [str(tmp_path / "no_train.jsonl"), str(tmp_path / "no_eval.jsonl")]


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    """One sqlite store for both entry-point runs: its tables are created once."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def run_stage(tmp_path: Path, train_rows: list[dict], eval_src: Path, mlflow_uri: str) -> subprocess.CompletedProcess:
    """`python -m pipeline.validate` in a temp project whose params.yaml points at the given data."""
    (tmp_path / "data").mkdir()
    write(tmp_path / "data" / "train.jsonl", train_rows)
    shutil.copy(eval_src, tmp_path / "data" / "eval.jsonl")
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["data"].update(train="data/train.jsonl", eval="data/eval.jsonl")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": mlflow_uri}
    return subprocess.run([sys.executable, "-m", "pipeline.validate"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_entry_point_good_data(sample_dir, tmp_path, mlflow_uri):
    proc = run_stage(tmp_path, records(sample_dir / "train.jsonl"), sample_dir / "eval.jsonl", mlflow_uri)
    assert proc.returncode == 0, proc.stderr
    assert "35/35 expectations passed" in proc.stdout
    assert (tmp_path / "reports" / "validation" / "index.html").is_file()
    metrics = json.loads((tmp_path / "metrics" / "validation.json").read_text(encoding="utf-8"))
    assert metrics["success"] is True and metrics["train_rows"] == 60


def test_entry_point_bad_data_exits_nonzero_with_message(sample_dir, tmp_path, mlflow_uri):
    rows = records(sample_dir / "train.jsonl")
    rows[16]["answer"] = 7
    proc = run_stage(tmp_path, rows, sample_dir / "eval.jsonl", mlflow_uri)
    assert proc.returncode == 1
    assert (f"error: data/train.jsonl:17 (id {rows[16]['id']}): expect_column_values_to_be_between on answer: "
            "value 7 not in 1..5") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "metrics" / "validation.json").read_text(encoding="utf-8"))["success"] is False
