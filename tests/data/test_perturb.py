"""Perturbed copies of the MCQ eval set (pipeline/data/perturb.py) and the robustness scores evaluate makes of them."""

from __future__ import annotations

import re

import pytest

from pipeline.config import load_params
from pipeline.data.formats import Example, mcq_prompt, prompt_of, structure_problems, to_example
from pipeline.data.perturb import (
    ORDINALS,
    POSITION,
    distractor_source,
    item_rng,
    mcq_record,
    perturb_records,
    perturbed_examples,
    sentences,
    typo_text,
)
from pipeline.data.readers import read_records
from pipeline.errors import DataError
from pipeline.metric_catalog import PERTURBATIONS

PARAMS = load_params()
RATE = PARAMS.evaluate.robustness.typo_rate


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    """The default params' 150 generated eval items (raw records and Examples as the reader makes them)."""
    from pipeline.data.synthetic import generate

    out = tmp_path_factory.mktemp("perturb")
    generate(PARAMS.sample_data, PARAMS.sample_data.num_choices, PARAMS.seed, out)
    examples = [to_example(r, "mcq", PARAMS.task) for r in read_records(out / "eval.jsonl")]
    return [mcq_record(e, PARAMS.task) for e in examples], examples


def stated_answer(record: dict) -> int | None:
    """The option position an explicit or ordinal item's passage states (None for a lookup item)."""
    match = POSITION.search(record["passage"])
    if match is None:
        return None
    if match["ord"] is not None:
        return [o.split()[0] for o in ORDINALS].index(match["ord"]) + 1
    return int(match["num"] or match["num2"])


def by_id(records: list[dict]) -> dict[str, dict]:
    return {r["id"]: r for r in records}


def levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, start=1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def test_records_read_back_from_the_rendered_prompt_are_the_raw_records(items):
    records, examples = items
    for record, example in zip(records, examples, strict=True):
        assert mcq_prompt(record["passage"], record["question"], record["choices"], PARAMS.task) == prompt_of(example)
        assert record["choices"] == example.choices and record["answer"] == example.answer
    assert {r["category"] for r in records} == {"explicit", "ordinal", "lookup"}
    assert all(stated_answer(r) == r["answer"] for r in records if r["category"] != "lookup")
    # An example rendered under another system prompt, or one whose split is ambiguous, is refused by id.
    other = Example(id="x1", source="eval.jsonl:1", messages=[{"role": "system", "content": "other"},
                                                              *examples[0].messages[1:]],
                    choices=examples[0].choices, answer=examples[0].answer)
    with pytest.raises(DataError, match="x1.*system prompt"):
        mcq_record(other, PARAMS.task)
    twice = dict(records[0], passage=records[0]["passage"] + "\n\n질문:\n가짜 질문?")
    messages = mcq_prompt(twice["passage"], twice["question"], twice["choices"], PARAMS.task)
    ambiguous = Example(id="x2", source="eval.jsonl:2", messages=messages + [{"role": "assistant", "content": "1"}],
                        choices=twice["choices"], answer=twice["answer"])
    with pytest.raises(DataError, match="x2.*two ways"):
        mcq_record(ambiguous, PARAMS.task)


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_same_seed_same_items_other_seed_other_items(items, kind):
    records, _ = items
    first = perturb_records(records, kind, 42, RATE)
    assert first == perturb_records(records, kind, 42, RATE)
    assert all(a != r for a, r in zip(first, records, strict=True))  # every default item is changed
    other = perturb_records(records, kind, 43, RATE)
    assert sum(a != b for a, b in zip(first, other, strict=True)) > 0.8 * len(records)
    assert [r["id"] for r in first] == [r["id"] for r in records]


def test_shuffle_moves_the_correct_option_and_keeps_its_text_correct(items):
    records, _ = items
    shuffled = perturb_records(records, "shuffle_choices", PARAMS.seed, RATE)
    for old, new in zip(records, shuffled, strict=True):
        assert sorted(new["choices"]) == sorted(old["choices"])
        assert new["choices"][new["answer"] - 1] == old["choices"][old["answer"] - 1]
        assert new["answer"] != old["answer"]
        # An item that states its answer by position now states the new position (same wording otherwise).
        assert stated_answer(new) == (None if old["category"] == "lookup" else new["answer"])
        assert POSITION.sub("#", new["passage"]) == POSITION.sub("#", old["passage"])
        assert new["question"] == old["question"]
    assert len({r["answer"] for r in shuffled}) == PARAMS.sample_data.num_choices  # not one fixed target
    two = {"id": "t", "passage": "가. 나.", "question": "?", "choices": ["예", "아니요"], "answer": 2}
    assert perturb_records([two], "shuffle_choices", 0, RATE)[0] == {**two, "choices": ["아니요", "예"], "answer": 1}
    # Every option reference moves with its option, not just the answer's.
    refs = {"id": "r", "passage": "2번 선택지는 틀렸다. 정답은 세 번째 선택지이다.", "question": "?",
            "choices": ["a", "b", "c", "d"], "answer": 3}
    new = perturb_records([refs], "shuffle_choices", 0, RATE)[0]
    assert new["passage"] == (f"{new['choices'].index('b') + 1}번 선택지는 틀렸다. "
                              f"정답은 {ORDINALS[new['answer'] - 1]} 선택지이다.")


def test_typos_honour_the_rate_and_keep_digits_and_answer_evidence(items):
    records, _ = items
    text = "지아의 가방은 하얀색이다. 지영의 가방은 보라색이다. 이 문제의 정답은 3번이다. 2024년에 민수는 서울에 산다. " * 4
    for rate in (0.05, 0.2):
        noisy, edits = typo_text(text, item_rng(1, "typos", "t"), rate, ["서울"])
        # Kept per sentence group: 년에 (a word with a digit), 서울 (an option), 번이다 and 정답은 (the answer statement).
        editable = sum(ch.isalpha() for ch in text) - 4 * (2 + 2 + 3 + 3)
        assert edits == round(rate * editable) and 1 <= levenshtein(text, noisy) <= 2 * edits
        assert noisy.count("정답은 3번이다.") == 4 and noisy.count("2024년에") == 4 and noisy.count("서울") == 4
        assert re.sub(r"\D", "", noisy) == re.sub(r"\D", "", text)
    noisy = perturb_records(records, "typos", PARAMS.seed, RATE)
    changed = sum(levenshtein(a["passage"], b["passage"]) for a, b in zip(records, noisy, strict=True))
    letters = sum(ch.isalpha() for r in records for ch in r["passage"])
    assert 0.5 * RATE < changed / letters < 2 * RATE  # every edit is 1 or 2 characters, on the editable share
    for old, new in zip(records, noisy, strict=True):
        assert {k: v for k, v in new.items() if k != "passage"} == {k: v for k, v in old.items() if k != "passage"}
        assert stated_answer(new) == stated_answer(old)  # explicit/ordinal: the statement survives
        assert re.sub(r"\D", "", new["passage"]) == re.sub(r"\D", "", old["passage"])
        for choice in old["choices"]:  # lookup: the evidence for each option stays verbatim
            assert new["passage"].count(choice) == old["passage"].count(choice)


def test_distractor_is_another_items_sentence_at_a_boundary_and_renders_through_the_template(items):
    records, examples = items
    pool = by_id(records)
    out = perturb_records(records, "distractor", PARAMS.seed, RATE)
    for old, new in zip(records, out, strict=True):
        donor, sentence = distractor_source(old, records, PARAMS.seed)
        assert donor != old["id"] and sentence in sentences(pool[donor]["passage"])
        assert sentence not in old["passage"] and not re.search(r"\d", sentence) and not POSITION.search(sentence)
        assert not any(c in sentence for c in old["choices"])
        got = sentences(new["passage"])
        assert len(got) == len(sentences(old["passage"])) + 1 and sentence in got
        got.remove(sentence)
        assert got == sentences(old["passage"])  # inserted between sentences, nothing else changed
        assert stated_answer(new) == stated_answer(old)
    assert len({distractor_source(r, records, PARAMS.seed)[0] for r in records}) > 0.5 * len(records)
    positions = {sentences(n["passage"]).index(distractor_source(o, records, PARAMS.seed)[1])
                 for o, n in zip(records, out, strict=True)}
    assert 0 in positions and len(positions) > 3  # the start and later boundaries are all used
    # As Examples: rendered through the task template exactly like the reader renders a raw record.
    copies = perturbed_examples(examples, "distractor", PARAMS.seed, PARAMS.task, RATE)
    assert [c.id for c in copies] == [e.id for e in examples]
    for copy, record, original in zip(copies, out, examples, strict=True):
        assert copy.messages == mcq_prompt(record["passage"], record["question"], record["choices"], PARAMS.task) + [
            {"role": "assistant", "content": str(record["answer"])}]
        assert mcq_record(copy, PARAMS.task) == record
        assert copy.source == f"{original.source} (distractor)" and copy.category == original.category


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_perturbed_items_pass_the_validation_rules(items, kind):
    records, _ = items
    for record in perturb_records(records, kind, PARAMS.seed, RATE):
        assert not structure_problems(record, "mcq").found, record


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_an_items_perturbation_does_not_depend_on_the_other_items(items, kind):
    records, _ = items
    full = by_id(perturb_records(records, kind, PARAMS.seed, RATE))
    subset = records[::-1][::2]  # another order, half the items
    part = perturb_records(subset, kind, PARAMS.seed, RATE)
    kept = {r["id"] for r in subset}
    same = [full[r["id"]] == r for r, s in zip(part, subset, strict=True)
            if kind != "distractor" or distractor_source(s, records, PARAMS.seed)[0] in kept]
    assert len(same) > 10 and all(same)  # a distractor's donor, when still there, is still chosen


def test_the_position_wording_is_the_sample_datas():
    from pipeline.data import synthetic

    assert ORDINALS == synthetic.ORDINALS


def test_robustness_metrics_on_a_tiny_model(tiny_world):
    from pipeline.evaluation.metrics import robustness_metrics
    from pipeline.evaluation.scoring import choose, option_logprobs
    from pipeline.evaluation.statistics import accuracy_ci95, clustered_ci95
    from pipeline.modeling.loading import load_causal_lm, load_tokenizer

    tokenizer, model = load_tokenizer(tiny_world.base), load_causal_lm(tiny_world.base).eval()
    examples = [to_example(r, "mcq", PARAMS.task) for r in read_records(tiny_world.data / "eval.jsonl")]
    metrics = robustness_metrics("base", model, tokenizer, examples, PARAMS)
    n = len(examples)
    assert {metrics[f"robust_n_items_{k}"] for k in PERTURBATIONS} == {n}
    assert metrics["base_robust_acc_ci95_low"] <= metrics["base_robust_accuracy"] <= metrics["base_robust_acc_ci95_high"]
    per_kind = [metrics[f"base_robust_accuracy_{k}"] for k in PERTURBATIONS]
    assert metrics["base_robust_accuracy"] == pytest.approx(sum(per_kind) / len(per_kind))  # equal counts: pooled
    # Each kind's score is that of its copy scored alone (scoring in one pass changes no prediction).
    by_item = {e.id: [] for e in examples}
    for kind in PERTURBATIONS:
        copy = perturbed_examples(examples, kind, PARAMS.seed, PARAMS.task, RATE)
        alone = choose(option_logprobs(model, tokenizer, copy, 4))
        assert metrics[f"base_robust_accuracy_{kind}"] == sum(p == e.answer for p, e in zip(alone, copy)) / n
        for p, e in zip(alone, copy):
            by_item[e.id].append(p == e.answer)
    # The pooled interval resamples items (an item's three copies together), not the 3n copies as if independent.
    interval = (metrics["base_robust_acc_ci95_low"], metrics["base_robust_acc_ci95_high"])
    assert interval == clustered_ci95(list(by_item.values()), PARAMS.seed)
    assert interval != pytest.approx(accuracy_ci95(round(metrics["base_robust_accuracy"] * 3 * n), 3 * n))
    # With the clean results, the clean accuracy on the same items (weighted as their copies) comes too.
    clean = [p == e.answer for p, e in zip(choose(option_logprobs(model, tokenizer, examples, 4)), examples)]
    with_clean = robustness_metrics("base", model, tokenizer, examples, PARAMS, clean)
    weights = {e.id: len(by_item[e.id]) for e in examples}
    assert with_clean["base_robust_clean_accuracy"] == pytest.approx(
        sum(ok * weights[e.id] for ok, e in zip(clean, examples)) / sum(weights.values()))
    off = PARAMS.model_copy(update={"evaluate": PARAMS.evaluate.model_copy(update={
        "robustness": PARAMS.evaluate.robustness.model_copy(update={"perturbations": []})})})
    assert robustness_metrics("base", model, tokenizer, examples, off) == {}
    assert robustness_metrics("base", model, tokenizer, examples, PARAMS) == metrics
