"""The five dataset formats and the one chat representation every stage uses.

`mcq`, `messages`, `alpaca` and `sharegpt` records all become an `Example` whose `messages` is an
OpenAI-style list of {"role": "system"|"user"|"assistant", "content": str}; `text` records stay text
(DAPT/TAPT). `structure_problems` says, per rule, why a record cannot become an example; the validate
stage turns those into Great Expectations results and only records without problems reach
`to_example`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.artifacts import PROCESSED_MANIFEST
from pipeline.config import CHAT_FORMATS, TaskParams
from pipeline.data.readers import DEFAULT_MAX_RECORD_BYTES, Record, bad_utf8, json_type, read_jsonl

FORMATS = CHAT_FORMATS + ("text",)
SUFFIXES = {"text": (".txt", ".jsonl", ".json", ".parquet")}  # chat formats: no .txt
CHAT_SUFFIXES = (".jsonl", ".json", ".parquet")

# format -> field -> (allowed JSON types, required)
FIELDS: dict[str, dict[str, tuple[tuple[str, ...], bool]]] = {
    "mcq": {"passage": (("string",), True), "question": (("string",), True), "choices": (("array",), True),
            "answer": (("integer", "string"), True)},
    "messages": {"messages": (("array",), True)},
    "alpaca": {"instruction": (("string",), True), "input": (("string",), False), "output": (("string",), True)},
    "sharegpt": {"conversations": (("array",), True)},
    "text": {"text": (("string",), True)},
}
OPTIONAL = {"id": ("string", "integer"), "category": ("string",), "type": ("string",)}  # any chat format
NON_EMPTY = {"mcq": ("passage", "question"), "alpaca": ("instruction", "output"), "text": ("text",)}
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
TURN_KEYS = {"messages": ("role", "content"), "sharegpt": ("from", "value")}


@dataclass
class Example:
    id: str
    source: str  # file:line or file[index]
    messages: list[dict]
    category: str | None = None
    choices: list[str] | None = None  # mcq only
    answer: int | None = None  # mcq only, 1-based
    answer_format: str | None = None  # mcq only: "text" when the answer is the option's words (None: its number)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Problems:
    """Rule name -> why the record breaks it (absent when it does not)."""

    found: dict[str, str] = field(default_factory=dict)

    def add(self, rule: str, message: str) -> None:
        self.found.setdefault(rule, message)


def record_id(record: Record) -> str:
    rid = record.value.get("id") if isinstance(record.value, dict) else None
    return str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) and str(rid).strip() else record.where()


def answer_index(answer, choices: list) -> tuple[int | None, str | None]:
    """(1-based index, problem): the answer is an index or the text of exactly one choice."""
    if isinstance(answer, bool):
        return None, f"answer must be an integer or a choice text, got {answer!r}"
    if isinstance(answer, int):
        return (answer, None) if 1 <= answer <= len(choices) else (None, f"answer {answer} not in 1..{len(choices)}")
    text = answer.strip()
    by_text = [i for i, c in enumerate(choices, start=1) if isinstance(c, str) and c.strip() == text]
    by_number = int(text) if text.isdigit() and 1 <= int(text) <= len(choices) else None
    if len(by_text) > 1:
        return None, f"answer {answer!r} matches choices {by_text}: ambiguous"
    if by_text and by_number is not None and by_text[0] != by_number:
        return None, f"answer {answer!r} is choice {by_text[0]}'s text and also the number of choice {by_number}: ambiguous"
    if by_text:
        return by_text[0], None
    if by_number is not None:
        return by_number, None
    return None, f"answer {answer!r} is neither a choice number in 1..{len(choices)} nor the text of a choice"


def mcq_problems(value: dict, min_choices: int, max_choices: int, problems: Problems) -> None:
    choices = value.get("choices")
    if not isinstance(choices, list):
        return  # the type rule reports it
    if not min_choices <= len(choices) <= max_choices:
        problems.add("choices_count", f"{len(choices)} choices, expected {min_choices}..{max_choices}")
    bad = [i for i, c in enumerate(choices, start=1) if not (isinstance(c, str) and c.strip())]
    if bad:
        problems.add("choices_non_empty", f"choice(s) {bad} are not non-empty strings")
        return
    norm = [" ".join(c.split()).lower() for c in choices]
    dups = sorted({i for i, c in enumerate(norm, start=1) if norm.count(c) > 1})
    if dups:
        problems.add("choices_distinct", f"choices {dups} are the same text")
    answer = value.get("answer")
    if json_type(answer) in ("integer", "string"):
        _, problem = answer_index(answer, choices)
        if problem:
            problems.add("answer_in_range" if isinstance(answer, int) else "answer_unambiguous", problem)


def turns(value: dict, fmt: str) -> list[tuple[object, object]] | None:
    """(role, content) pairs of a messages/sharegpt record, roles mapped to system/user/assistant."""
    key = "messages" if fmt == "messages" else "conversations"
    items = value.get(key)
    if not isinstance(items, list):
        return None
    role_key, content_key = TURN_KEYS[fmt]
    out = []
    for item in items:
        if not isinstance(item, dict):
            out.append((None, None))
            continue
        role = item.get(role_key)
        if fmt == "sharegpt":
            role = SHAREGPT_ROLES.get(role, f"?{role}")
        out.append((role, item.get(content_key)))
    return out


def conversation_problems(value: dict, fmt: str, problems: Problems) -> None:
    pairs = turns(value, fmt)
    if pairs is None:
        return
    role_key, content_key = TURN_KEYS[fmt]
    if not pairs:
        problems.add("turns_schema", "no turns (empty list)")
        return
    for i, (role, content) in enumerate(pairs):
        if role is None and content is None:
            problems.add("turns_schema", f"turn {i} is not an object with `{role_key}` and `{content_key}`")
        elif not isinstance(content, str):
            problems.add("turns_schema", f"turn {i}: `{content_key}` must be a string, got {json_type(content)}")
    if "turns_schema" in problems.found:
        return
    known = {"system", "user", "assistant"}
    for i, (role, _) in enumerate(pairs):
        if role not in known:
            shown = role[1:] if isinstance(role, str) and role.startswith("?") else role
            allowed = "human, gpt, system" if fmt == "sharegpt" else "system, user, assistant"
            problems.add("roles_known", f"turn {i}: unknown role {shown!r} (allowed: {allowed})")
            return
    roles = [r for r, _ in pairs]
    if "system" in roles[1:]:
        problems.add("system_first", f"turn {roles.index('system', 1)}: a system turn may only come first")
    rest = roles[1:] if roles[0] == "system" else roles
    for i, role in enumerate(rest):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected and role != "system":
            problems.add("alternation", f"turn {i + (len(roles) - len(rest))}: expected {expected}, got {role} "
                                        "(after an optional system turn, user and assistant alternate)")
            break
    if roles[-1] != "assistant":
        problems.add("ends_with_assistant", f"the last turn is {roles[-1]}; a training example ends with an assistant turn")
    empty = [i for i, (r, c) in enumerate(pairs) if r == "assistant" and not c.strip()]
    if empty:
        problems.add("assistant_non_empty", f"assistant turn(s) {empty} are empty")


def needs_passage(task: TaskParams) -> bool:
    """An mcq item must carry a passage when the task's template shows one; closed-book sets (ARC, MMLU)
    use a template without `{passage}` and may leave it empty or out."""
    return "{passage}" in task.user_template


def structure_problems(value, fmt: str, min_choices: int = 2, max_choices: int = 10,
                       passage: bool = True) -> Problems:
    """Every structural rule the record breaks (schema, choices/answer, roles); empty when it can become an
    Example. `passage=False`: an mcq passage is optional (see needs_passage)."""
    problems = Problems()
    if not isinstance(value, dict):
        problems.add("required", f"record must be an object, got {json_type(value)}")
        return problems
    for name, (types, required) in FIELDS[fmt].items():
        v = value.get(name)
        if fmt == "mcq" and name == "passage" and not passage:
            required = False
        if v is None:
            if required:
                problems.add("required", f"`{name}` is missing" if name not in value else f"`{name}` is null")
        elif json_type(v) not in types:
            problems.add("type", f"`{name}` must be a JSON {' or '.join(types)}, got {json_type(v)}")
    for name, types in OPTIONAL.items():
        if fmt != "text" and value.get(name) is not None and json_type(value[name]) not in types:
            problems.add("type", f"`{name}` must be a JSON {' or '.join(types)}, got {json_type(value[name])}")
    for name in NON_EMPTY.get(fmt, ()):
        if fmt == "mcq" and name == "passage" and not passage:
            continue
        if isinstance(value.get(name), str) and not value[name].strip():
            problems.add("non_empty", f"`{name}` is empty or whitespace")
    if problem := bad_utf8(value):
        problems.add("utf8", problem)
    if problems.found:
        return problems
    if fmt == "mcq":
        mcq_problems(value, min_choices, max_choices, problems)
    elif fmt in TURN_KEYS:
        conversation_problems(value, fmt, problems)
    return problems


def render_choices(choices: list[str]) -> str:
    return "\n".join(f"{i}. {choice}" for i, choice in enumerate(choices, start=1))


def answer_content(k: int, choices: list[str], answer_format: str | None) -> str:
    """The assistant's answer naming option k (1-based): its number (the seed documents' 정답), or with `text` the
    option's words, so the options' log-likelihoods weigh what each says (as cloze scoring does) and not only
    which position a small model binds to it."""
    return choices[k - 1] if answer_format == "text" else str(k)


def mcq_prompt(passage: str, question: str, choices: list[str], task: TaskParams) -> list[dict]:
    """System + user messages of an MCQ item (the seed documents' 지문/질문/선택지/정답 template)."""
    user = task.user_template.format(passage=passage, question=question, choices=render_choices(choices))
    return [{"role": "system", "content": task.system_prompt}, {"role": "user", "content": user}]


def to_example(record: Record, fmt: str, task: TaskParams) -> Example:
    """The record as a chat. Only for records with no structure_problems."""
    v = record.value
    category = v.get("category", v.get("type"))
    base = {"id": record_id(record), "source": record.where(), "category": category}
    if fmt == "mcq":
        index, _ = answer_index(v["answer"], v["choices"])
        messages = mcq_prompt(v.get("passage") or "", v["question"], v["choices"], task)
        answer_format = None if task.answer_format == "number" else task.answer_format
        messages.append({"role": "assistant", "content": answer_content(index, v["choices"], answer_format)})
        return Example(messages=messages, choices=list(v["choices"]), answer=index, answer_format=answer_format,
                       **base)
    if fmt == "alpaca":
        user = v["instruction"] + (f"\n\n{v['input']}" if isinstance(v.get("input"), str) and v["input"].strip() else "")
        return Example(messages=[{"role": "user", "content": user}, {"role": "assistant", "content": v["output"]}], **base)
    if fmt in TURN_KEYS:
        return Example(messages=[{"role": r, "content": c} for r, c in turns(v, fmt)], **base)
    raise ValueError(f"{fmt} records are text, not chats")


def prompt_of(example: Example) -> list[dict]:
    """Everything before the final assistant turn: what a model is asked at evaluation."""
    return example.messages[:-1]


def normalised(text: str) -> str:
    return " ".join(text.split()).lower()


def processed_record_limit(processed_dir: str | Path, name: str, max_record_bytes: int) -> int:
    """The line limit for a processed dataset: `validate.max_record_bytes`, or the longest line validate wrote.

    Normalisation can make a record longer than its input line: an MCQ item becomes a chat that carries
    its passage and choices twice (rendered into the prompt and as `choices`) plus the template, a Parquet
    or JSON-array record had no line to measure, JSON escaping differs. The validate stage records each
    dataset's longest processed line in manifest.json (`max_line_bytes`), so data it accepted under the
    limit is never refused downstream; a line longer than both (a foreign or corrupted file) still is.
    """
    try:
        manifest = json.loads((Path(processed_dir) / PROCESSED_MANIFEST).read_text(encoding="utf-8"))
        written = int(manifest.get("max_line_bytes", {}).get(name, 0))
    except (OSError, ValueError, TypeError, AttributeError):
        written = 0  # no manifest (or an older one): the params' limit alone
    return max(max_record_bytes, written)


def read_examples(processed_dir: str | Path, name: str,
                  max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> list[Example]:
    """A chat dataset as the validate stage wrote it (the only data later stages train or evaluate on)."""
    limit = processed_record_limit(processed_dir, name, max_record_bytes)
    return [Example(**row) for row in read_jsonl(Path(processed_dir) / f"{name}.jsonl", limit)]


def read_texts(processed_dir: str | Path, name: str, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> list[str]:
    """A text dataset (DAPT corpus, held-out text) as the validate stage wrote it."""
    limit = processed_record_limit(processed_dir, name, max_record_bytes)
    return [row["text"] for row in read_jsonl(Path(processed_dir) / f"{name}.jsonl", limit)]
