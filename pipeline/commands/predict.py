"""Inference from the registry: `python -m pipeline.commands.predict --model-uri models:/<name>@champion --input items.jsonl`.

Loads base + adapter exactly as registered (pipeline/registry/lock.py): the adapter and tokenizer from the
model version's artifacts, the base the version owns (its logged base artifact, checked by sha256, or
its hub id at the pinned revision), quantized as the adapter was trained. Items become prompts with
the version's own `task` params (from its `params_json` tag), not the current checkout's. Each MCQ
item is answered by the log-likelihood of its options, as the evaluate stage scores them.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from pipeline.cli import cli_parser, run_cli
from pipeline.config import load_params
from pipeline.data.formats import (
    CHAT_SUFFIXES,
    Example,
    needs_passage,
    structure_problems,
    to_example,
)
from pipeline.data.readers import DEFAULT_MAX_RECORD_BYTES, Record, read_records
from pipeline.errors import DataError
from pipeline.evaluation.scoring import choose, option_logprobs
from pipeline.registry.read import load_registered, version_task
from pipeline.tracking import configure


def mcq_examples(path: str | Path, task, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> list[Example]:
    """MCQ items of a user's file (any format `data` accepts, lines up to `validate.max_record_bytes`);
    `answer` is optional here."""
    examples = []
    for record in read_records(path, CHAT_SUFFIXES, max_record_bytes):
        has_answer = isinstance(record.value, dict) and record.value.get("answer") is not None
        value = record.value if has_answer else {**record.value, "answer": 1}
        problems = structure_problems(value, "mcq", passage=needs_passage(task)).found
        if problems:
            rule, message = next(iter(problems.items()))
            raise DataError(f"{record.where()}: {rule}: {message}")
        example = to_example(Record(record.file, record.index, record.by_line, value), "mcq", task)
        examples.append(example if has_answer else replace(example, answer=None))
    return examples


def predict(model_uri: str, input_path: str | Path, params) -> tuple[list[dict], dict]:
    model, tokenizer, version, *_ = load_registered(model_uri)
    examples = mcq_examples(input_path, version_task(version) or params.task, params.validation.max_record_bytes)
    predictions = choose(option_logprobs(model, tokenizer, examples, params.evaluate.batch_size))
    summary = {"model": f"models:/{version.name}/{version.version}", "n_items": len(examples)}
    if all(e.answer is not None for e in examples):
        summary["accuracy"] = sum(p == e.answer for p, e in zip(predictions, examples, strict=True)) / len(examples)
    rows = [{"id": e.id, "prediction": p} for e, p in zip(examples, predictions, strict=True)]
    return rows, summary


def main(argv: list[str] | None = None) -> None:
    parser = cli_parser(__doc__, "python -m pipeline.commands.predict")
    parser.add_argument("--model-uri", required=True, help="models:/<name>@<alias> or models:/<name>/<version>")
    parser.add_argument("--input", required=True, help="MCQ items, JSONL")
    parser.add_argument("--output", help="predictions JSONL (default: stdout)")
    args = parser.parse_args(argv)
    params = load_params()
    configure(params)
    rows, summary = predict(args.model_uri, args.input, params)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if args.output:
        Path(args.output).write_text(lines, encoding="utf-8")
    else:
        sys.stdout.write(lines)
    print(json.dumps(summary), file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
