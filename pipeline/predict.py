"""Inference from the registry: `python -m pipeline.predict --model-uri models:/<name>@champion --input items.jsonl`.

Loads base + adapter exactly as registered: the adapter and tokenizer from the model version's
artifacts, the base from the path MLflow recorded, checked against the version's sha256 tag (a base
directory that changed since registration is refused), quantized as the adapter was trained. Each MCQ
item is answered by the log-likelihood of its options, as the evaluate stage scores them.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import yaml

from pipeline.config import load_params, run_cli
from pipeline.data import DataError, Record, read_records
from pipeline.evaluate import choose, option_logprobs
from pipeline.formats import CHAT_SUFFIXES, Example, structure_problems, to_example
from pipeline.modeling import load_causal_lm, model_fingerprint, template_fingerprint
from pipeline.tracking import configure


def model_version(client, model_uri: str):
    """The registry entry of models:/<name>@<alias> or models:/<name>/<version>."""
    ref = model_uri.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, _, version = ref.partition("/")
    if not version:
        raise DataError(f"{model_uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
    return client.get_model_version(name, version)


def load_registered(model_uri: str):
    """(model, tokenizer, version) for a registered adapter, refusing a changed base."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    import mlflow
    from mlflow import MlflowClient

    try:
        version = model_version(MlflowClient(), model_uri)
    except mlflow.exceptions.MlflowException as exc:
        raise DataError(f"{model_uri}: not in the registry ({exc.message})") from None
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{version.name}/{version.version}"))
    flavor = yaml.safe_load((local / "MLmodel").read_text(encoding="utf-8"))["flavors"]["transformers"]
    base = flavor.get("local_base_model_path") or flavor["source_model_name"]
    expected = version.tags.get("adapter_base_sha256")
    if expected and model_fingerprint(base) != expected:
        raise DataError(f"{model_uri}: the base model at {base} changed since version {version.version} was "
                        f"registered (sha256 {expected[:12]}...); restore it (git checkout + dvc checkout of the "
                        f"version's commit {version.tags.get('git_commit', '?')[:12]}) or reproduce the version")
    tokenizer = AutoTokenizer.from_pretrained(local / "components" / "tokenizer")
    expected = version.tags.get("chat_template_sha256")
    if expected and template_fingerprint(tokenizer) != expected:
        raise DataError(f"{model_uri}: the tokenizer's chat template or special tokens differ from the ones the "
                        f"adapter was trained with (fingerprint {expected[:12]}...); prompts would not match training")
    model = load_causal_lm(base, version.tags.get("sft.quantization", "none"),
                           version.tags.get("sft.double_quant", "True") == "True",
                           version.tags.get("sft.compute_dtype", "float32"))
    model = PeftModel.from_pretrained(model, str(local / "peft")).eval()
    return model, tokenizer, version


def mcq_examples(path: str | Path, task) -> list[Example]:
    """MCQ items of a user's file (any format `data` accepts); `answer` is optional here."""
    examples = []
    for record in read_records(path, CHAT_SUFFIXES):
        has_answer = isinstance(record.value, dict) and record.value.get("answer") is not None
        value = record.value if has_answer else {**record.value, "answer": 1}
        problems = structure_problems(value, "mcq").found
        if problems:
            rule, message = next(iter(problems.items()))
            raise DataError(f"{record.where()}: {rule}: {message}")
        example = to_example(Record(record.file, record.index, record.by_line, value), "mcq", task)
        examples.append(example if has_answer else replace(example, answer=None))
    return examples


def predict(model_uri: str, examples: list[Example], params) -> tuple[list[dict], dict]:
    model, tokenizer, version = load_registered(model_uri)
    predictions = choose(option_logprobs(model, tokenizer, examples, params.evaluate.batch_size))
    summary = {"model": f"models:/{version.name}/{version.version}", "n_items": len(examples)}
    if all(e.answer is not None for e in examples):
        summary["accuracy"] = sum(p == e.answer for p, e in zip(predictions, examples, strict=True)) / len(examples)
    rows = [{"id": e.id, "prediction": p} for e, p in zip(examples, predictions, strict=True)]
    return rows, summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", required=True, help="models:/<name>@<alias> or models:/<name>/<version>")
    parser.add_argument("--input", required=True, help="MCQ items, JSONL")
    parser.add_argument("--output", help="predictions JSONL (default: stdout)")
    args = parser.parse_args(argv)
    params = load_params()
    configure(params)
    rows, summary = predict(args.model_uri, mcq_examples(args.input, params.task), params)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if args.output:
        Path(args.output).write_text(lines, encoding="utf-8")
    else:
        sys.stdout.write(lines)
    print(json.dumps(summary), file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
