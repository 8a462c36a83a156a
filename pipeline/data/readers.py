"""Reading dataset files: JSONL, JSON, Parquet and plain text, one file or a directory of shards.

Every record remembers where it came from (file plus line number, or file plus 0-based index for JSON
arrays and Parquet rows), so each later message can name it. Anything unreadable (missing path,
empty file, bad UTF-8, a binary file, a truncated JSON line, an over-long line) is a `DataError` whose
message names the file, the record and what to do. Nothing here knows about formats: `pipeline.data.formats`
turns records into chats.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import DataError

SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
DEFAULT_MAX_RECORD_BYTES = 10_000_000  # one record (line) larger than this is refused before it is parsed


@dataclass(frozen=True)
class Record:
    file: str
    index: int  # line number (JSONL, text) or 0-based position (JSON array, Parquet row)
    by_line: bool
    value: object

    def where(self) -> str:
        return f"{self.file}:{self.index}" if self.by_line else f"{self.file}[{self.index}]"


def data_files(path: str | Path, suffixes: tuple[str, ...] = SUFFIXES) -> list[Path]:
    """The file itself, or every data file of a directory of shards (sorted, so the order is stable)."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"{path}: directory holds no data files; expected shards ending in {', '.join(suffixes)}")
    else:
        raise DataError(f"{path}: no such file or directory; point params.yaml `data` at an existing dataset")
    for file in files:
        if file.suffix.lower() not in suffixes:
            raise DataError(f"{file}: unsupported file type {file.suffix or '(no suffix)'!r}; "
                            f"this dataset accepts {', '.join(suffixes)}")
    return files


def _json_name(value) -> str:
    """The JSON name of a parsed value's type (an array, not a Python `list`), for messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _lines(file: Path, max_record_bytes: int):
    """(line number, decoded text) for every non-blank line, without ever holding an over-long line."""
    with file.open("rb") as f:
        lineno = 0
        while True:
            raw = f.readline(max_record_bytes + 1)
            if not raw:
                return
            lineno += 1
            if len(raw) > max_record_bytes:
                raise DataError(f"{file}:{lineno}: line longer than {max_record_bytes:,} bytes "
                                "(validate.max_record_bytes); is this the right file? split the record or raise the limit")
            if b"\x00" in raw:
                raise DataError(f"{file}:{lineno}: contains NUL bytes; this looks like a binary file, not text")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{file}:{lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start} of the line); "
                                "a binary file? text must be UTF-8 encoded") from None
            if text.strip():
                yield lineno, text


def _read_jsonl(file: Path, max_record_bytes: int) -> list[Record]:
    records = []
    for lineno, text in _lines(file, max_record_bytes):
        try:
            value = json.loads(text.rstrip("\r\n"))  # without the line end, a truncated line's column is on this line
        except json.JSONDecodeError as exc:
            raise DataError(f"{file}:{lineno}: not valid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno}); "
                            "each line must be one complete JSON object") from None
        if not isinstance(value, dict):
            raise DataError(f"{file}:{lineno}: each line must be a JSON object, got {_json_name(value)}")
        records.append(Record(str(file), lineno, True, value))
    return records


def _read_json(file: Path, max_record_bytes: int) -> list[Record]:
    if file.stat().st_size > 100 * max_record_bytes:
        raise DataError(f"{file}: {file.stat().st_size:,} bytes is too large for one JSON document; use JSONL or Parquet")
    raw = file.read_bytes()
    if b"\x00" in raw:
        raise DataError(f"{file}: contains NUL bytes; this looks like a binary file, not JSON")
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}: not valid UTF-8 ({exc.reason} at byte {exc.start}); re-encode the file as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{file}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
    if not isinstance(value, list):
        raise DataError(f"{file}: a .json dataset must be an array of records, got {_json_name(value)}")
    for i, row in enumerate(value):
        if not isinstance(row, dict):
            raise DataError(f"{file}[{i}]: each record must be a JSON object, got {_json_name(row)}")
    return [Record(str(file), i, False, row) for i, row in enumerate(value)]


def _read_parquet(file: Path, max_record_bytes: int) -> list[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{file}: not a readable Parquet file ({exc})") from None
    return [Record(str(file), i, False, row) for i, row in enumerate(table.to_pylist())]


def _read_text(file: Path, max_record_bytes: int) -> list[Record]:
    return [Record(str(file), lineno, True, {"text": text.strip()}) for lineno, text in _lines(file, max_record_bytes)]


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".txt": _read_text}


def read_records(path: str | Path, suffixes: tuple[str, ...] = SUFFIXES,
                 max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> list[Record]:
    """Every record of a file or directory of shards; DataError on anything unreadable or empty."""
    records = []
    for file in data_files(path, suffixes):
        if file.stat().st_size == 0:
            raise DataError(f"{file}: empty file; expected at least one record")
        found = READERS[file.suffix.lower()](file, max_record_bytes)
        if not found:
            raise DataError(f"{file}: no records (only blank lines)")
        records += found
    return records


def read_jsonl(path: str | Path, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> list[dict]:
    """The objects of a JSONL file (the processed data, or a user's file for `predict`)."""
    return [r.value for r in read_records(path, (".jsonl",), max_record_bytes)]


def write_jsonl(path: Path, rows: list[dict]) -> int:
    """Write rows as JSONL; return the longest line's length in bytes (line end included, as `_lines` counts)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    longest = 0
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            line = json.dumps(row, ensure_ascii=False) + "\n"
            f.write(line)
            longest = max(longest, len(line.encode("utf-8")))
    return longest


# What a parsed value is, before any format applies (the validate stage's type and UTF-8 rules).

def json_type(value) -> str | None:
    """JSON type name of a parsed value; None for null (the `required` rule reports it); NaN is its own type."""
    if value is None:
        return None
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "boolean"
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else "number"
    return {int: "integer", str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def bad_utf8(value) -> str | None:
    """A string holding a lone surrogate (JSON `\\udc80`) is not encodable as UTF-8: name where it is."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"not valid UTF-8 (lone surrogate at character {exc.start})"
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if problem := bad_utf8(v):
                return f"[{i}] {problem}"
    elif isinstance(value, dict):
        for k, v in value.items():
            if problem := bad_utf8(v):
                return f"{k}: {problem}"
    return None
