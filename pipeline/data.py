"""Reading datasets and rendering MCQ items as chats: the one place every stage gets its data from."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import TaskParams


class DataError(Exception):
    """Bad input a user can fix: the message names file, record and rule."""


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; point params.yaml `data` at an existing JSONL file")
    rows = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: each line must be a JSON object, got {type(row).__name__}")
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no records (empty file)")
    return rows


def read_lines(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; point params.yaml `data` at an existing text file")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    lines = [line for line in lines if line]
    if not lines:
        raise DataError(f"{path}: no text (empty file)")
    return lines


def render_choices(choices: list[str]) -> str:
    return "\n".join(f"{i}. {choice}" for i, choice in enumerate(choices, start=1))


def mcq_prompt(item: dict, task: TaskParams) -> list[dict]:
    """System + user messages of an MCQ item (the seed documents' 지문/질문/선택지/정답 template)."""
    user = task.user_template.format(
        passage=item["passage"], question=item["question"], choices=render_choices(item["choices"])
    )
    return [{"role": "system", "content": task.system_prompt}, {"role": "user", "content": user}]


def mcq_messages(item: dict, task: TaskParams) -> list[dict]:
    """The full chat: prompt plus the assistant turn answering the option number."""
    return mcq_prompt(item, task) + [{"role": "assistant", "content": str(item["answer"])}]
