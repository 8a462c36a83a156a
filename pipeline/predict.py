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
from pathlib import Path

import yaml

from pipeline.config import load_params, run_cli
from pipeline.data import DataError, read_jsonl
from pipeline.evaluate import accuracy_report, choose, option_logprobs
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
    import mlflow
    from mlflow import MlflowClient
    from peft import PeftModel
    from transformers import AutoTokenizer

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


def predict(model_uri: str, items: list[dict], params) -> tuple[list[dict], dict]:
    model, tokenizer, version = load_registered(model_uri)
    scores = option_logprobs(model, tokenizer, items, params)
    summary = {"model": f"models:/{version.name}/{version.version}", "n_items": len(items)}
    if all("answer" in item for item in items):
        accuracy, predictions = accuracy_report(items, scores)
        summary["accuracy"] = accuracy["all"]
    else:
        predictions = choose(scores)
    rows = [{"id": item.get("id"), "prediction": pred} for item, pred in zip(items, predictions, strict=True)]
    return rows, summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", required=True, help="models:/<name>@<alias> or models:/<name>/<version>")
    parser.add_argument("--input", required=True, help="MCQ items, JSONL")
    parser.add_argument("--output", help="predictions JSONL (default: stdout)")
    args = parser.parse_args(argv)
    params = load_params()
    configure(params)
    rows, summary = predict(args.model_uri, read_jsonl(args.input), params)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if args.output:
        Path(args.output).write_text(lines, encoding="utf-8")
    else:
        sys.stdout.write(lines)
    print(json.dumps(summary), file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
