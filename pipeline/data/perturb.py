"""Perturbed copies of an MCQ eval set: what the evaluate stage's robustness scores are measured on.

Each perturbation takes an mcq record (`id`, `passage`, `question`, `choices`, `answer` as a 1-based
number) and returns a changed copy. Its randomness comes from a sha256 of (seed, kind, item id), so an
item is perturbed the same way on every machine and whatever other items are perturbed with it (the
distractor's donor too: among the other items, the one with the lowest hash that has a usable sentence).

- `shuffle_choices`: the options in a new order, the correct one always moved (two options or more), the
  answer re-mapped to the same option text. A passage or question that names an option by its position
  (the demo items' `정답은 3번` and `정답은 세 번째 선택지`, see POSITION) is renumbered with the options,
  so the same option stays correct and the item stays answerable.
- `typos`: max(1, round(typo_rate * n)) edits among the n editable characters, at non-adjacent
  positions, each a swap with the next character, a drop or a duplication. Editable: letters (Hangul
  syllables, Latin) only. Never touched: whitespace, punctuation, digits, a whole word holding a digit
  (an explicit item states its answer as a number), a position reference, an option's text where the
  passage repeats it (a lookup item's evidence). The passage is edited; the question where the template
  shows no passage (closed-book items).
- `distractor`: one sentence of another item's passage inserted at a sentence boundary of this one (the
  start and the end included). A sentence that could point at an answer is never used: one with a digit
  or a position reference, or one holding any of this item's option texts.

A perturbed record becomes an `Example` through `formats.to_example`, with the task template the
original was rendered with (`perturbed_examples`). Only mcq eval sets have options to perturb; other
formats get no robustness scores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re

from pipeline.config import TaskParams
from pipeline.data.formats import (
    Example,
    mcq_prompt,
    needs_passage,
    prompt_of,
    render_choices,
    to_example,
)
from pipeline.data.readers import Record
from pipeline.errors import DataError
from pipeline.metric_catalog import PERTURBATIONS

# Korean ordinals of option positions 1..10, as the demo items write them (sample_data.ORDINALS).
ORDINALS = ["첫 번째", "두 번째", "세 번째", "네 번째", "다섯 번째", "여섯 번째", "일곱 번째",
            "여덟 번째", "아홉 번째", "열 번째"]
_ORDINAL = "|".join(re.escape(o.split()[0]) for o in ORDINALS)
# A reference to an option by position: "정답은 3번", "3번 선택지", "세 번째 선택지" (group `num` or `ord`).
POSITION = re.compile(rf"정답은\s*(?P<num>\d+)\s*번|(?<!\d)(?P<num2>\d+)\s*번\s*선택지"
                      rf"|(?<!\S)(?P<ord>{_ORDINAL})\s*번째\s*선택지")
SENTENCE_END = re.compile(r"[.!?。](?=\s|$)")


def item_rng(seed: int, kind: str, item_id: str) -> random.Random:
    """The generator of one item's perturbation: a sha256 of its inputs, no hash-seed or order dependence."""
    digest = hashlib.sha256(f"{seed}|{kind}|{item_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def renumber(text: str, new_position: dict[int, int]) -> str:
    """Position references to option p rewritten to new_position[p] (the same wording)."""
    def swap(match: re.Match) -> str:
        if match["ord"] is not None:
            old = next(i for i, o in enumerate(ORDINALS, start=1) if o.split()[0] == match["ord"])
            new = new_position.get(old, old)
            return ORDINALS[new - 1].split()[0] + match.group()[len(match["ord"]):]
        group = "num" if match["num"] is not None else "num2"
        old = int(match[group])
        start, end = match.start(group) - match.start(), match.end(group) - match.start()
        return match.group()[:start] + str(new_position.get(old, old)) + match.group()[end:]
    return POSITION.sub(swap, text)


def shuffle_choices(record: dict, seed: int) -> dict:
    """The options reordered with the correct one moved; the answer and position references follow them."""
    choices, old = record["choices"], record["answer"]
    if len(choices) < 2:
        return dict(record)
    rng = item_rng(seed, "shuffle_choices", record["id"])
    target = rng.choice([p for p in range(1, len(choices) + 1) if p != old])
    rest = [p for p in range(1, len(choices) + 1) if p != old]
    rng.shuffle(rest)
    layout = rest[:target - 1] + [old] + rest[target - 1:]  # layout[j]: the old position now at j + 1
    new_position = {p: j for j, p in enumerate(layout, start=1)}
    return {**record, "choices": [choices[p - 1] for p in layout], "answer": target,
            "passage": renumber(record["passage"], new_position),
            "question": renumber(record["question"], new_position)}


def protected_mask(text: str, keep: list[str]) -> list[bool]:
    """Characters typos may not touch: words holding a digit, position references, every occurrence of `keep`."""
    mask = [not ch.isalpha() for ch in text]
    spans = [m.span() for m in re.finditer(r"\S+", text) if any(ch.isdigit() for ch in m.group())]
    spans += [m.span() for m in POSITION.finditer(text)]
    for phrase in filter(None, (k.strip() for k in keep)):
        spans += [(m.start(), m.start() + len(phrase)) for m in re.finditer(re.escape(phrase), text)]
    for start, end in spans:
        mask[start:end] = [True] * (end - start)
    return mask


def typo_text(text: str, rng: random.Random, rate: float, keep: list[str]) -> tuple[str, int]:
    """`text` with typos at `rate` of its editable characters (see the module doc), and the number of edits."""
    protected = protected_mask(text, keep)
    editable = [i for i, p in enumerate(protected) if not p]
    if not editable:
        return text, 0
    want = max(1, round(rate * len(editable)))
    chosen: set[int] = set()
    for i in rng.sample(editable, len(editable)):  # a random order; adjacent edits would overlap
        if len(chosen) == want:
            break
        if i - 1 not in chosen and i + 1 not in chosen:
            chosen.add(i)
    words = {i: len([j for j in range(m.start(), m.end()) if text[j].isalpha()])
             for m in re.finditer(r"\S+", text) for i in range(m.start(), m.end())}
    chars = list(text)
    for i in sorted(chosen, reverse=True):  # right to left: an edit does not shift the positions still to edit
        ops = ["duplicate"]
        if i + 1 < len(text) and not protected[i + 1] and text[i + 1] != text[i]:
            ops.append("swap")
        if words[i] >= 2:  # a word keeps at least one letter
            ops.append("drop")
        op = rng.choice(ops)
        if op == "swap":
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
        elif op == "drop":
            del chars[i]
        else:
            chars.insert(i, chars[i])
    return "".join(chars), len(chosen)


def typos(record: dict, seed: int, rate: float, field: str = "passage") -> dict:
    """Typo noise in the record's `field` (the passage; the question for closed-book items)."""
    rng = item_rng(seed, "typos", record["id"])
    text, _ = typo_text(record[field], rng, rate, record["choices"])
    return {**record, field: text}


def sentence_bounds(text: str) -> list[int]:
    """Offsets where a sentence may be inserted: the start and right after each sentence's end mark."""
    return [0] + [m.end() for m in SENTENCE_END.finditer(text)]


def sentences(text: str) -> list[str]:
    bounds = sentence_bounds(text) + [len(text)]
    return [s for s in (text[a:b].strip() for a, b in zip(bounds, bounds[1:])) if s]


def usable_distractor(sentence: str, record: dict) -> bool:
    """A new sentence that cannot point at one of the record's options: no digit, position or option text."""
    return (not any(ch.isdigit() for ch in sentence) and not POSITION.search(sentence)
            and sentence not in record["passage"]  # a sentence it already has would change nothing
            and not any(c.strip() and c.strip() in sentence for c in record["choices"]))


def distractor_source(record: dict, pool: list[dict], seed: int) -> tuple[str, str] | None:
    """(donor id, sentence) for the record's distractor, or None when no other item has a usable sentence.

    Donors are tried in the order of a sha256 of (seed, this id, donor id), so the choice depends only on
    which items are in the pool, not on their order."""
    def rank(other: dict) -> bytes:
        return hashlib.sha256(f"{seed}|distractor|{record['id']}|{other['id']}".encode()).digest()

    rng = item_rng(seed, "distractor", record["id"])
    for donor in sorted((r for r in pool if r["id"] != record["id"]), key=rank):
        candidates = [s for s in sentences(donor["passage"]) if usable_distractor(s, record)]
        if candidates:
            return donor["id"], rng.choice(candidates)
    return None


def distractor(record: dict, pool: list[dict], seed: int) -> dict:
    """The record with another item's sentence inserted at one of its sentence boundaries."""
    found = distractor_source(record, pool, seed)
    if found is None or not record["passage"].strip():
        return dict(record)
    _, sentence = found
    passage = record["passage"]
    at = item_rng(seed, "distractor-at", record["id"]).choice(sentence_bounds(passage))
    passage = f"{sentence} {passage}" if at == 0 else f"{passage[:at]} {sentence}{passage[at:]}"
    return {**record, "passage": passage}


def perturb_records(records: list[dict], kind: str, seed: int, typo_rate: float,
                    typo_field: str = "passage") -> list[dict]:
    """Each record's perturbed copy of `kind` (a copy equal to the record where the kind cannot change it)."""
    if kind == "shuffle_choices":
        return [shuffle_choices(r, seed) for r in records]
    if kind == "typos":
        return [typos(r, seed, typo_rate, typo_field) for r in records]
    if kind == "distractor":
        return [distractor(r, records, seed) for r in records]
    raise ValueError(f"unknown perturbation {kind!r}; known: {', '.join(PERTURBATIONS)}")


def mcq_record(example: Example, task: TaskParams) -> dict:
    """The mcq record fields an Example was rendered from: its prompt read back through the task template.

    Refuses an example the template does not render back to, or whose passage and question could be split
    in two ways (a passage holding the template's own text between them)."""
    marks = {"passage": "\x00P\x00", "question": "\x00Q\x00", "choices": "\x00C\x00"}
    skeleton = re.escape(task.user_template.format(**marks))
    choices = re.escape(render_choices(example.choices))
    user = prompt_of(example)[-1]["content"]
    fields = []
    for lazy in (True, False):
        pattern = skeleton.replace(re.escape(marks["choices"]), choices)
        for name in ("passage", "question"):
            pattern = pattern.replace(re.escape(marks[name]), f"(?P<{name}>.*{'?' if lazy else ''})")
        match = re.fullmatch(pattern, user, flags=re.DOTALL)
        fields.append(None if match is None else match.groupdict())
    if fields[0] is None or fields[0] != fields[1]:
        why = "does not follow task.user_template" if fields[0] is None else "splits into passage and question two ways"
        raise DataError(f"{example.source} (id {example.id}): its prompt {why}, so it cannot be perturbed; "
                        "set evaluate.robustness.perturbations: [] to evaluate without robustness")
    record = {"id": example.id, "passage": fields[0].get("passage", ""), "question": fields[0]["question"],
              "choices": list(example.choices), "answer": example.answer, "category": example.category}
    if mcq_prompt(record["passage"], record["question"], record["choices"], task) != prompt_of(example):
        raise DataError(f"{example.source} (id {example.id}): its prompt is not this task's system prompt and template "
                        "(data validated under other task params? rerun validate)")
    return record


def perturbed_examples(examples: list[Example], kind: str, seed: int, task: TaskParams,
                       typo_rate: float) -> list[Example]:
    """The perturbed copies of `kind` that differ from their originals, as Examples through the task template
    (same id; the source names the kind). Items the kind cannot change (one option, no editable letter, no
    usable donor sentence) are left out, so a score is never of unchanged items."""
    records = [mcq_record(e, task) for e in examples]
    field = "passage" if needs_passage(task) else "question"
    out = []
    for example, record, changed in zip(examples, records, perturb_records(records, kind, seed, typo_rate, field),
                                        strict=True):
        if changed == record:
            continue
        copy = to_example(Record(file=example.source, index=0, by_line=True, value=changed), "mcq", task)
        out.append(dataclasses.replace(copy, source=f"{example.source} ({kind})"))
    return out
