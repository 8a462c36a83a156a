"""The shipped demo data: deterministic, balanced, labelled by type, held-out sets that are really held out."""

import collections
import json

from pipeline.config import load_params
from pipeline.data.synthetic import generate


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_generator_is_deterministic_and_balanced(tmp_path):
    params = load_params()
    counts = generate(params.sample_data, params.sample_data.num_choices, params.seed, tmp_path / "a")
    generate(params.sample_data, params.sample_data.num_choices, params.seed, tmp_path / "b")
    for name in ("train.jsonl", "validation.jsonl", "eval.jsonl", "domain_train.txt", "domain_eval.txt",
                 "general_eval.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert counts["train"] >= 500 and counts["eval"] >= 100

    train, held_out = _rows(tmp_path / "a" / "train.jsonl"), _rows(tmp_path / "a" / "eval.jsonl")
    for rows in (train, held_out, _rows(tmp_path / "a" / "validation.jsonl")):
        answers = collections.Counter(r["answer"] for r in rows)
        assert sorted(answers) == [1, 2, 3, 4, 5]
        assert max(answers.values()) - min(answers.values()) <= 3, answers
        assert {r["type"] for r in rows} == {"explicit", "ordinal", "lookup"}
        for r in rows:
            assert len(r["choices"]) == 5 and len(set(r["choices"])) == 5
            assert 1 <= r["answer"] <= 5
    assert not {(r["passage"], r["question"]) for r in train} & {(r["passage"], r["question"]) for r in held_out}
    # Explicit items state the answer; lookup items carry no hint.
    explicit = next(r for r in train if r["type"] == "explicit")
    assert f"{explicit['answer']}번" in explicit["passage"]
    lookup = next(r for r in train if r["type"] == "lookup")
    assert lookup["choices"][lookup["answer"] - 1] in lookup["passage"]


def test_other_seed_gives_other_data(tmp_path):
    params = load_params()
    generate(params.sample_data, params.sample_data.num_choices, 1, tmp_path / "a")
    generate(params.sample_data, params.sample_data.num_choices, 2, tmp_path / "b")
    assert (tmp_path / "a" / "train.jsonl").read_bytes() != (tmp_path / "b" / "train.jsonl").read_bytes()


def _lines(path):
    return path.read_text(encoding="utf-8").splitlines()


def test_held_out_sets_share_nothing_with_what_is_trained_on(tmp_path):
    params = load_params()
    counts = generate(params.sample_data, params.sample_data.num_choices, params.seed, tmp_path)
    train, validation, eval_rows = (_rows(tmp_path / f"{n}.jsonl") for n in ("train", "validation", "eval"))
    assert counts["validation"] == len(validation) == params.sample_data.n_validation
    prompt = lambda r: (r["passage"], r["question"])
    assert not {prompt(r) for r in validation} & {prompt(r) for r in train + eval_rows}
    ids = [r["id"] for r in train + validation + eval_rows]
    assert len(ids) == len(set(ids))
    # No held-out domain line is a corpus line (the DAPT perplexity would measure memorisation) ...
    corpus, held = set(_lines(tmp_path / "domain_train.txt")), _lines(tmp_path / "domain_eval.txt")
    assert len(held) == params.sample_data.n_heldout_lines and not set(held) & corpus
    # ... however large the corpus: its held-out-only slice of facts is never stated in it (rejection against the
    # corpus alone would run out of unseen lines once the corpus states every fact).
    big = params.sample_data.model_copy(update={"n_train": 20, "n_eval": 10, "n_validation": 10,
                                                "n_domain_lines": 20000, "n_heldout_lines": 200})
    generate(big, big.num_choices, params.seed, tmp_path / "big")
    assert not set(_lines(tmp_path / "big/domain_eval.txt")) & set(_lines(tmp_path / "big/domain_train.txt"))
