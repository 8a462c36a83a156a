"""The expectations of the data gate: one Great Expectations suite per dataset, built per format.

Row i of a split's frame is record i of the dataset, so GX's unexpected indices map straight back to a
file, line and id. Schema rules run on the raw fields; rules GX cannot compute itself (UTF-8, choices and
answer, roles and turn order, template rendering) run on helper columns computed here, each holding the
value the expectation checks. Rules after templating use `pipeline.modeling.chat_template.encode_chat`, the function the
`sft` stage trains with, so the label audit sees the trainer's own masks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.config import Params
from pipeline.data.formats import (
    FIELDS,
    NON_EMPTY,
    OPTIONAL,
    needs_passage,
    normalised,
)
from pipeline.data.readers import json_type
from pipeline.data.splits import Split, digest, prompt_key
from pipeline.modeling.chat_template import span_ends

EMAIL = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"
PHONE = r"(?:\+?\d{1,3}[ .-])?\(?\d{2,4}\)?[ .-]\d{3,4}[ .-]\d{4}"
PROBLEM_RULES = ("utf8", "choices_count", "choices_non_empty", "choices_distinct", "answer_in_range",
                 "answer_unambiguous", "turns_schema", "roles_known", "system_first", "alternation",
                 "ends_with_assistant", "assistant_non_empty")


def frame(split: Split, stop_ids: set[int]):
    import pandas as pd

    def col(values, dtype=object):
        if dtype is object:  # raw cells GX can hash: NaN is a value (the type rule reports it), not a null
            values = [_gx_cell(v) for v in values]  # for the `required` rule; lone surrogates escaped for pyarrow
        return pd.Series(values, dtype=dtype)

    rows = [r.value if isinstance(r.value, dict) else {} for r in split.records]
    columns = {}
    for name in list(FIELDS[split.fmt]) + ([] if split.fmt == "text" else list(OPTIONAL)):
        columns[name] = col([row.get(name) for row in rows])
        columns[f"{name}__type"] = col([json_type(row.get(name)) for row in rows])
    for name in NON_EMPTY.get(split.fmt, ()):
        columns[f"{name}__chars"] = col([len(x.strip()) if isinstance(x := row.get(name), str) else None for row in rows],
                                        "Int64")
    for rule in PROBLEM_RULES:
        columns[f"problem__{rule}"] = col([p.get(rule) for p in split.problems])
    texts = [" ".join(m["content"] for m in e.messages) if e else (row.get("text") if split.fmt == "text" else None)
             for e, row in zip(split.examples or [None] * len(rows), rows, strict=True)]
    columns["all_text"] = col([t if isinstance(t, str) else None for t in texts])
    if split.corpus_copy:
        columns["problem__heldout_overlap"] = col(split.corpus_copy)
    if split.is_chat:
        enc = split.encoded
        columns["problem__template_renders"] = col(split.template_problem)
        columns["n_tokens"] = col([max(len(x.input_ids) for x in e) if e else None for e in enc], "Int64")
        columns["n_trainable"] = col([min(x.n_trainable for x in e) if e else None for e in enc], "Int64")
        columns["prompt_consistent"] = col([all(x.prompt_consistent for x in e) if e else None for e in enc])
        columns["stops"] = col([None if not e or not all(x.n_trainable for x in e)
                                else all(t in stop_ids for x in e for t in span_ends(x)) for e in enc])
        columns["id_key"] = col([str(row["id"]) if isinstance(row.get("id"), (str, int)) else None for row in rows])
        columns["dup_exact"] = col([digest(e.messages) if e else None for e in split.examples])
        columns["dup_normalised"] = col([digest([[m["role"], normalised(m["content"])] for m in e.messages]) if e else None
                                         for e in split.examples])
        columns["prompt_key"] = col([prompt_key(e) for e in split.examples])
    return pd.DataFrame(columns)


def _gx_cell(value):
    """A frame cell as GX may see it: float NaN becomes the string "NaN" (pandas would count it as null and
    the `required` rule would fire on a present field); a string with a lone surrogate (JSON "\\udc80", the
    `utf8` rule) is backslash-escaped, since pandas hashes cells through UTF-8 and would raise."""
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


@dataclass
class Rule:
    name: str  # rule name (params validate.severity keys)
    field: str  # what the rule is about, as the user knows it
    expectation: object
    detail: Callable[[int], str]  # row index -> why that record fails
    severity: str = "error"


def build_rules(split: Split, params: Params, references: list[Split], stop_ids: set[int], tokenizer) -> list[Rule]:
    """The suite of one split; `references` are the splits its prompts must not appear in (leakage rule):
    train for eval, train and eval for validation. A held-out text split with `corpus_copy` gets the
    heldout_overlap rule."""
    import great_expectations as gx

    ex = gx.expectations
    v = params.validation
    problem = lambda rule: (lambda i: split.problems[i][rule])
    rules: list[Rule] = []
    closed_book = split.fmt == "mcq" and not needs_passage(params.task)  # passage optional (formats.needs_passage)
    for name, (types, required) in FIELDS[split.fmt].items():
        if required and not (closed_book and name == "passage"):
            rules.append(Rule("required", name, ex.ExpectColumnValuesToNotBeNull(
                column=name, description=f"every record has `{name}`, not null"), problem("required")))
        rules.append(Rule("type", name, ex.ExpectColumnValuesToBeInSet(
            column=f"{name}__type", value_set=list(types), description=f"`{name}` is a JSON {' or '.join(types)}"),
            problem("type")))
    if split.is_chat:
        for name, types in OPTIONAL.items():
            rules.append(Rule("type", name, ex.ExpectColumnValuesToBeInSet(
                column=f"{name}__type", value_set=list(types), description=f"optional `{name}` is a JSON "
                                                                          f"{' or '.join(types)}"), problem("type")))
    for name in NON_EMPTY.get(split.fmt, ()):
        if closed_book and name == "passage":
            continue
        rules.append(Rule("non_empty", name, ex.ExpectColumnValuesToBeBetween(
            column=f"{name}__chars", min_value=1, description=f"`{name}` is not empty or whitespace"),
            problem("non_empty")))
    checks = {"utf8": ("every string is valid UTF-8 (no lone surrogates)", "*")}
    if split.fmt == "mcq":
        checks |= {"choices_count": (f"{v.min_choices}..{v.max_choices} choices", "choices"),
                   "choices_non_empty": ("every choice is a non-empty string", "choices"),
                   "choices_distinct": ("choices are distinct (whitespace/case-normalised)", "choices"),
                   "answer_in_range": ("an integer answer is a 1-based choice number", "answer"),
                   "answer_unambiguous": ("a text answer names exactly one choice", "answer")}
    if split.fmt in ("messages", "sharegpt"):
        key = "messages" if split.fmt == "messages" else "conversations"
        checks |= {"turns_schema": ("every turn is an object with a string role and content", key),
                   "roles_known": ("only known roles", key),
                   "system_first": ("a system turn only comes first", key),
                   "alternation": ("user and assistant turns alternate, starting with user", key),
                   "ends_with_assistant": ("the last turn is the assistant's", key),
                   "assistant_non_empty": ("no empty assistant turn", key)}
    for rule, (description, on) in checks.items():
        rules.append(Rule(rule, on, ex.ExpectColumnValuesToBeNull(column=f"problem__{rule}", description=description),
                          problem(rule), v.level(rule)))
    rules.append(Rule("pii", "e-mail", ex.ExpectColumnValuesToNotMatchRegex(
        column="all_text", regex=EMAIL, description="no e-mail addresses (PII)"),
        lambda i: "contains an e-mail address: " + re.search(EMAIL, _text(split, i)).group(), v.level("pii")))
    rules.append(Rule("pii", "phone", ex.ExpectColumnValuesToNotMatchRegex(
        column="all_text", regex=PHONE, description="no phone numbers (PII)"),
        lambda i: "contains a phone number: " + re.search(PHONE, _text(split, i)).group(), v.level("pii")))
    if split.is_chat:
        rules += chat_rules(split, params, references, stop_ids, tokenizer)
    if split.corpus_copy:
        rules.append(Rule("heldout_overlap", "text", ex.ExpectColumnValuesToBeNull(
            column="problem__heldout_overlap", description="no held-out line is also a domain_corpus line "
                                                           "(whitespace/case-normalised)"),
            lambda i: f"the line is also domain_corpus line {split.corpus_copy[i]}: perplexity on it measures "
                      "memorisation, not the domain", v.level("heldout_overlap")))
    rules = [r for r in rules if r.severity != "off"]
    for n, rule in enumerate(rules):
        rule.expectation.meta = {"rule": n, "name": rule.name, "severity": rule.severity}
    return rules


def _text(split: Split, i: int) -> str:
    e = split.examples[i]
    return " ".join(m["content"] for m in e.messages) if e else split.records[i].value.get("text", "")


def _lines_of(split: Split, key: Callable[[int], str | None]) -> dict[str, list[str]]:
    where: dict[str, list[str]] = {}
    for i in range(len(split.records)):
        if (k := key(i)) is not None:
            where.setdefault(k, []).append(split.records[i].where())
    return where


def chat_rules(split: Split, params: Params, references: list[Split], stop_ids: set[int], tokenizer) -> list[Rule]:
    import great_expectations as gx

    ex = gx.expectations
    v = params.validation
    max_length = params.sft.max_length
    enc = split.encoded
    stop_names = ", ".join(sorted(tokenizer.convert_ids_to_tokens(sorted(stop_ids))))
    rules = [
        Rule("template_renders", "chat template", ex.ExpectColumnValuesToBeNull(
            column="problem__template_renders", description="the chat template renders and masks the chat"),
            lambda i: split.template_problem[i]),
        Rule("max_length", "tokens", ex.ExpectColumnValuesToBeBetween(
            column="n_tokens", max_value=max_length, description=f"at most sft.max_length={max_length} tokens after "
                                                                 "templating"),
            lambda i: f"{max(len(x.input_ids) for x in enc[i])} tokens > sft.max_length={max_length}"
                      + (" (dropped: validate.overlong=drop)" if v.overlong == "drop" else ""),
            "warn" if v.overlong == "drop" else "error"),
        Rule("trainable_tokens", "labels", ex.ExpectColumnValuesToBeBetween(
            column="n_trainable", min_value=1, description="label audit: at least one trainable token after masking"),
            lambda i: "no trainable token after templating and masking: the loss would ignore this example",
            v.level("trainable_tokens")),
        Rule("stop_token", "labels", ex.ExpectColumnValuesToBeInSet(
            column="stops", value_set=[True], description=f"label audit: every answer's last trainable token is a stop "
                                                          f"token ({shown_in_docs(stop_names)})"),
            lambda i: "answer ends with " + ", ".join(repr(tokenizer.convert_ids_to_tokens(t)) for x in enc[i]
                                                      for t in span_ends(x) if t not in stop_ids)
                      + f", not a stop token ({stop_names}): the model would not learn to stop", v.level("stop_token")),
    ]
    rules.append(Rule("prompt_consistent", "chat template", ex.ExpectColumnValuesToBeInSet(
        column="prompt_consistent", value_set=[True], description="the template renders the prompt the same with and "
                                                                   "without the answer (training matches generation)"),
        lambda i: "the chat template renders this prompt differently once the answer follows (e.g. it drops the "
                  "system turn): training sees another prompt than generation; fix it with task.chat_template",
        v.level("prompt_consistent")))
    ids = _lines_of(split, lambda i: str(x) if isinstance(x := _field(split, i, "id"), (str, int)) else None)
    exact = _lines_of(split, lambda i: digest(split.examples[i].messages) if split.examples[i] else None)
    rules += [
        Rule("unique_id", "id", ex.ExpectColumnValuesToBeUnique(column="id_key", description="no duplicate ids"),
             lambda i: "duplicate id, at " + ", ".join(ids[str(_field(split, i, "id"))]), v.level("unique_id")),
        Rule("duplicate_exact", "record", ex.ExpectColumnValuesToBeUnique(
            column="dup_exact", description="no exact duplicate chats in the split"),
            lambda i: "exact duplicate of " + ", ".join(w for w in exact[digest(split.examples[i].messages)]
                                                        if w != split.records[i].where()), v.level("duplicate_exact")),
        Rule("duplicate_normalised", "record", ex.ExpectColumnValuesToBeUnique(
            column="dup_normalised", description="no duplicates after whitespace/case normalisation"),
            lambda i: "same chat as another record after whitespace/case normalisation", v.level("duplicate_normalised")),
    ]
    for ref in references:
        rules.append(_leakage_rule(split, ref, v.level("leakage")))
    return rules


def _leakage_rule(split: Split, ref: Split, severity: str) -> Rule:
    import great_expectations as gx

    seen: dict[str, str] = {}
    for i, e in enumerate(ref.examples):
        if (k := prompt_key(e)) is not None:
            seen.setdefault(k, ref.where(i))
    return Rule("leakage", "prompt", gx.expectations.ExpectColumnValuesToNotBeInSet(
        column="prompt_key", value_set=sorted(seen),
        description=f"no {split.name} prompt (normalised) also appears in {ref.name}"),
        lambda i: f"the prompt also appears in {ref.name} at {seen[prompt_key(split.examples[i])]}", severity)


def shown_in_docs(text: str) -> str:
    """Data Docs render descriptions as markdown and drop `<...>` as HTML: show token brackets as ‹ ›."""
    return text.replace("<", "‹").replace(">", "›")


def _field(split: Split, i: int, name: str):
    value = split.records[i].value
    return value.get(name) if isinstance(value, dict) else None
