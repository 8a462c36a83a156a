"""The datasets of one validation run as splits: records, parsed examples, carving, held-out overlap.

A `Split` keeps a dataset's records and their parsed examples side by side, so every later message can
name file and line. Validation can be carved from train by a sha256 of each normalised prompt
(deterministic, disjoint); held-out text lines that repeat a corpus line are marked, and the share of
their word n-grams found in the corpus is measured.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from pipeline.config import Params
from pipeline.data.formats import (
    Example,
    needs_passage,
    normalised,
    prompt_of,
    structure_problems,
    to_example,
)
from pipeline.data.readers import Record
from pipeline.errors import TemplateError
from pipeline.modeling.chat_template import Encoded, encode_chat


def digest(value) -> str:
    return hashlib.sha1(json.dumps(value, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Split:
    name: str
    path: str
    fmt: str
    records: list[Record]
    problems: list[dict] = field(default_factory=list)  # per record: rule -> message
    examples: list[Example | None] = field(default_factory=list)
    encoded: list[list[Encoded] | None] = field(default_factory=list)
    template_problem: list[str | None] = field(default_factory=list)
    corpus_copy: list[str | None] = field(default_factory=list)  # held-out text: where the line is in the corpus

    def subset(self, name: str, indices: list[int]) -> Split:
        """Records `indices` (prepared) as another split; each keeps its own file:line."""
        pick = lambda values: [values[i] for i in indices] if values else []
        return Split(name, self.path, self.fmt, pick(self.records), pick(self.problems), pick(self.examples),
                     pick(self.encoded), pick(self.template_problem), pick(self.corpus_copy))

    def where(self, i: int) -> str:
        record = self.records[i]
        rid = record.value.get("id") if isinstance(record.value, dict) else None
        return record.where() + (f" (id {rid})" if isinstance(rid, (str, int)) and str(rid).strip() else "")

    @property
    def is_chat(self) -> bool:
        return self.fmt != "text"


def prepare(split: Split, params: Params, tokenizer) -> None:
    """Structure problems per record; for sound chat records the Example and its encoding."""
    v = params.validation
    for record in split.records:
        found = structure_problems(record.value, split.fmt, v.min_choices, v.max_choices,
                                   needs_passage(params.task)).found
        split.problems.append(found)
        example = encoded = template = None
        if split.is_chat and not (set(found) - {"choices_distinct"}):
            example = to_example(record, split.fmt, params.task)
            try:
                encoded = encode_chat(tokenizer, example.messages)
            except TemplateError as exc:
                template = str(exc)
        split.examples.append(example)
        split.encoded.append(encoded)
        split.template_problem.append(template)


def prompt_key(example: Example | None) -> str | None:
    """The normalised question of an example (everything before the final answer), for the leakage rule."""
    return digest([[m["role"], normalised(m["content"])] for m in prompt_of(example)]) if example else None


def carve_validation(train: Split, fraction: float) -> tuple[Split, Split]:
    """(train, validation): about `fraction` of the prepared train split, chosen by content, not by position.

    Records are grouped by their normalised prompt (a record that cannot become an example: by its raw
    value) and the groups ranked by a sha256 of that key; the lowest-ranked groups become validation
    until it holds round(fraction * n) records (at least one, never all). Deterministic across processes
    and hash seeds, independent of record order, and a prompt's copies stay on one side, so carving
    cannot itself put a validation prompt into train (the leakage rule still checks).
    """
    keys = [prompt_key(e) or "raw:" + json.dumps(r.value, sort_keys=True, default=str)
            for r, e in zip(train.records, train.examples or [None] * len(train.records), strict=True)]
    sizes: dict[str, int] = {}
    for k in keys:
        sizes[k] = sizes.get(k, 0) + 1
    target = min(len(keys) - 1, max(1, round(fraction * len(keys))))
    chosen, taken = set(), 0
    for k in sorted(sizes, key=lambda k: hashlib.sha256(k.encode()).hexdigest()):
        if taken >= target:
            break
        if taken + sizes[k] < len(keys):  # never carve the whole of train
            chosen.add(k)
            taken += sizes[k]
    held = [i for i, k in enumerate(keys) if k in chosen]
    return (train.subset(train.name, [i for i, k in enumerate(keys) if k not in chosen]),
            train.subset("validation", held))


HELDOUT_TEXTS = ("domain_eval", "general_eval")  # perplexity sets: none of their lines may be a corpus line
NGRAM = 4  # word n-grams for the held-out/corpus overlap share


def _line_key(record: Record) -> str | None:
    text = record.value.get("text") if isinstance(record.value, dict) else None
    return normalised(text) if isinstance(text, str) and text.strip() else None


def mark_corpus_copies(heldout: Split, corpus: Split) -> None:
    """For each held-out line, where it also is in the corpus (whitespace/case-normalised), or None."""
    where: dict[str, str] = {}
    for r in corpus.records:
        if (k := _line_key(r)) is not None:
            where.setdefault(k, r.where())
    heldout.corpus_copy = [where.get(k) if (k := _line_key(r)) is not None else None for r in heldout.records]


def _grams(words: list[str], n: int):
    return (" ".join(words[i:i + n]) for i in range(len(words) - n + 1))


def corpus_overlap(heldout: Split, corpus: Split, n: int = NGRAM) -> dict:
    """How much of the held-out text the corpus already holds: the share of lines that are corpus lines, and the
    share of word n-grams (whitespace words, normalised) that occur in some corpus line. A line of fewer than n
    words counts as one gram of all its words, looked up among the corpus's grams of that length."""
    lines = [k.split() for r in heldout.records if (k := _line_key(r)) is not None]
    corpus_lines = [k.split() for r in corpus.records if (k := _line_key(r)) is not None]
    lengths = {min(n, len(w)) for w in lines}
    known = {m: {g for w in corpus_lines for g in _grams(w, m)} for m in lengths}
    grams = [(g, m) for w in lines for m in [min(n, len(w))] for g in _grams(w, m)]
    copies = sum(c is not None for c in heldout.corpus_copy) if heldout.corpus_copy else 0
    return {"line_share": copies / len(lines) if lines else 0.0,
            "ngram_share": sum(g in known[m] for g, m in grams) / len(grams) if grams else 0.0,
            "lines": len(lines), "ngrams": len(grams)}
