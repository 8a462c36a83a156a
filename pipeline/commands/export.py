"""Export a registered version: `python -m pipeline.export --model-uri models:/<name>@champion --format gguf --quant f16`.

`--format gguf` (`--quant f16` or `q8_0`): the adapter is merged into the version's own base (unquantized, float32;
the merged logits are checked against base+adapter as `merge` does), llama.cpp's converter writes one GGUF (the
chat template and the end-of-turn tokens in its metadata) and an Ollama `Modelfile` goes beside it. Then the
GGUF is verified in llama.cpp itself before anything is kept:
- tokens: llama.cpp tokenizes every eval prompt (as rendered by the chat template) into the pipeline's tokens;
- stop: every token that ends the pipeline's generations ends llama.cpp's (end of generation);
- answers: each eval item is scored by its options' log-likelihoods, as evaluate scores it, in llama.cpp and in
  the merged model; the share of items where both choose the same option must reach `--min-agreement`
  (default 0.99 at f16, 0.95 at q8_0);
- generations: greedy generations on `--greedy-items` prompts, compared token for token (reported);
- Modelfile: its TEMPLATE, rendered by Go's text/template (Ollama's engine), gives the chat template's text for
  every eval prompt and for chats of other shapes.
A failed check exits non-zero with nothing written to `--out` and nothing logged. A verified export goes to
`--out` (default exports/<name>-v<version>-gguf-<quant>) and to the version's run (artifacts
`exports/gguf-<quant>/`) with tags `export.gguf.<quant>.*` (sha256, agreement, uri) on the model version.

`--format vllm`: the directory vLLM's LoRA serving needs, from the version: `adapter/` (the PEFT adapter as
trained), `base/` (the version's own base, when it is a logged artifact), the chat template it was trained with
and `serve-vllm.sh`, the exact `vllm serve ... --enable-lora --lora-modules <name>=adapter` command, with
`--quantization bitsandbytes` for a QLoRA adapter (docs/serving.md). No GPU here: written, not run.

`python -m pipeline.export` (pipeline/export/__main__.py) and `python -m pipeline.commands.export` both run this.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from pipeline.cli import cli_parser, run_cli
from pipeline.errors import DataError

FORMATS = ("gguf", "vllm")
DEFAULT_MIN_AGREEMENT = {"f16": 0.99, "q8_0": 0.95}
REPORT = "export.json"


def version_and_files(model_uri: str):
    """(version, its downloaded model directory, base, revision, tokenizer) checked as load_adapter checks them."""
    import mlflow
    from mlflow import MlflowClient
    from transformers import AutoTokenizer

    from pipeline.modeling.loading import template_fingerprint
    from pipeline.registry.read import model_version, registry_call, tagged_base

    try:
        version = registry_call(model_version, MlflowClient(), model_uri)
    except mlflow.exceptions.MlflowException as exc:
        raise DataError(f"{model_uri}: not in the registry ({exc.message})") from None
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{version.name}/{version.version}"))
    base, revision = tagged_base(version.tags, local, model_uri)
    tokenizer = AutoTokenizer.from_pretrained(local / "components" / "tokenizer")
    expected = version.tags.get("chat_template_sha256")
    if expected and template_fingerprint(tokenizer) != expected:
        raise DataError(f"{model_uri}: the tokenizer's chat template differs from the one the adapter was trained with")
    return version, local, base, revision, tokenizer


def eval_items(version, params, items: str | None):
    """The items to verify on: --items, else the processed eval split (its md5 compared with the version's)."""
    from pipeline.artifacts import file_md5
    from pipeline.commands.predict import mcq_examples
    from pipeline.data.formats import read_examples
    from pipeline.registry.read import version_task

    path = Path(items) if items else Path(params.validation.out_dir) / "eval.jsonl"
    if not path.exists():
        raise DataError(f"{path}: no items to verify the export on; run the pipeline (dvc repro) or pass --items")
    if items:
        examples = mcq_examples(path, version_task(version) or params.task, params.validation.max_record_bytes)
    else:
        examples = [e for e in read_examples(params.validation.out_dir, "eval", params.validation.max_record_bytes)
                    if e.choices]
    if not examples:
        raise DataError(f"{path}: no MCQ items in it to verify the export on")
    same = file_md5(path) == version.tags.get("data_eval_md5")
    return examples, {"items": str(path), "n_items": len(examples), "items_are_versions_eval": same}


def export_gguf(args, params) -> dict:
    from pipeline.artifacts import replaced_whole, write_text_atomically
    from pipeline.gguf.verify import refusals, write_gguf
    from pipeline.modeling.merging import merged_model
    from pipeline.data.formats import prompt_of
    from pipeline.modeling.chat_template import stop_token_ids
    from pipeline.registry.read import version_task

    quant = args.quant
    floor = args.min_agreement if args.min_agreement is not None else DEFAULT_MIN_AGREEMENT[quant]
    if not 0 < floor <= 1:
        raise DataError(f"--min-agreement {floor}: expected a share in (0, 1]")
    version, local, base, revision, tokenizer = version_and_files(args.model_uri)
    examples, items = eval_items(version, params, args.items)
    task = version_task(version) or params.task
    out = Path(args.out or f"exports/{version.name}-v{version.version}-gguf-{quant}")
    started = time.monotonic()
    merged, diff = merged_model(base, local / "peft", tokenizer, [prompt_of(e) for e in examples[:8]], "float32",
                                args.tolerance, revision, on_cpu=True)
    with replaced_whole(out, owned_by=REPORT) as tmp:
        report = write_gguf(tmp, merged, tokenizer, examples, stop_token_ids(base, tokenizer, revision),
                            task.system_prompt, quant, params.evaluate.batch_size, greedy_items=args.greedy_items,
                            max_new_tokens=args.max_new_tokens, num_ctx=args.num_ctx, pre_tokenizer=args.pre_tokenizer,
                            template_check=not args.skip_template_check)
        report.update({"model": f"models:/{version.name}/{version.version}", "min_agreement": floor,
                       "merge_max_abs_logit_diff": diff, **items})
        failures = refusals(report)
        if failures:
            raise DataError(f"{args.model_uri}: the {quant} GGUF fails verification, nothing kept or logged: "
                            + "; ".join(failures))
        report["export_s"] = round(time.monotonic() - started, 1)
        (tmp / REPORT).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if not args.no_log:
        report["uri"] = log_export(version, out, f"gguf-{quant}", report)
        write_text_atomically(out / REPORT, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def log_export(version, out: Path, name: str, report: dict) -> str:
    """The export as artifacts of the version's run and as tags of the version; returns the artifact URI."""
    from mlflow import MlflowClient

    from pipeline.registry.read import registry_call

    client = MlflowClient()
    if not version.run_id:
        raise DataError(f"models:/{version.name}/{version.version} has no run to log the export to")
    registry_call(client.log_artifacts, version.run_id, str(out), f"exports/{name}")
    uri = f"runs:/{version.run_id}/exports/{name}"
    prefix = f"export.{name.replace('-', '.')}"
    tags = {"uri": uri, "file": report.get("file", ""), "sha256": report.get("sha256", ""),
            "agreement": report.get("agreement", ""), "tokenizer_agreement": report.get("tokenizer_agreement", ""),
            "greedy_identical": f"{report.get('greedy_identical', '')}/{report.get('greedy_items', '')}",
            "template_check": (f"{checked['identical']}/{checked['chats']} chats rendered identically in Go"
                               if isinstance(checked := report.get("template_check"), dict) else str(checked))}
    for key, value in tags.items():
        if value != "" and value != "/":
            registry_call(client.set_model_version_tag, version.name, version.version, f"{prefix}.{key}", str(value))
    return uri


def export_vllm(args, params) -> dict:
    """adapter/ + base/ + serve-vllm.sh for `vllm serve --enable-lora` (no GPU here: the command is written, not run)."""
    from pipeline.artifacts import replaced_whole
    from pipeline.gguf import convert

    version, local, base, revision, _ = version_and_files(args.model_uri)
    config = json.loads((local / "peft" / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA":
        raise DataError(f"{args.model_uri}: vLLM serves LoRA adapters only; this one is {config.get('peft_type')}")
    if config.get("use_dora"):
        raise DataError(f"{args.model_uri}: vLLM's LoRA serving has no DoRA; merge it instead "
                        "(python -m pipeline.commands.merge) or export it as GGUF")
    if set(config.get("modules_to_save") or []) - {"embed_tokens", "lm_head"}:
        raise DataError(f"{args.model_uri}: vLLM cannot serve an adapter with modules_to_save "
                        f"{config['modules_to_save']}; merge it instead (python -m pipeline.commands.merge)")
    rank = max(8, 1 << (int(config["r"]) - 1).bit_length())
    out = Path(args.out or f"exports/{version.name}-v{version.version}-vllm")
    lora = f"{version.name}-v{version.version}"
    with replaced_whole(out, owned_by=REPORT) as tmp:
        shutil.copytree(local / "peft", tmp / "adapter")
        if Path(base).is_dir():
            shutil.copytree(base, tmp / "base")
            served = '"$here/base"'
        else:
            served = base + (f" --revision {revision}" if revision else "")
        # The chat template the adapter was trained with (vLLM would apply the base's own otherwise).
        template = local / "components" / "tokenizer" / "chat_template.jinja"
        shutil.copyfile(template, tmp / "chat_template.jinja")
        convert.strip_training_markers(tmp)
        quantized = " --quantization bitsandbytes" if version.tags.get("sft.quantization") in ("nf4", "fp4") else ""
        command = (f'vllm serve {served}{quantized} --enable-lora --max-lora-rank {rank} '
                   f'--lora-modules {lora}="$here/adapter" --chat-template "$here/chat_template.jinja" "$@"')
        (tmp / "serve-vllm.sh").write_text(f'#!/bin/sh\n# {version.name} v{version.version} on its base; requests '
                                           f'name the model "{lora}".\nhere=$(cd "$(dirname "$0")" && pwd)\n'
                                           f'exec {command}\n', encoding="utf-8")
        (tmp / "serve-vllm.sh").chmod(0o755)
        report = {"model": f"models:/{version.name}/{version.version}", "format": "vllm", "lora_name": lora,
                  "max_lora_rank": rank, "base": base, "revision": revision, "command": command}
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def main(argv: list[str] | None = None) -> None:
    from pipeline.config import load_params
    from pipeline.tracking import configure

    parser = cli_parser(__doc__, "python -m pipeline.export")
    parser.add_argument("--model-uri", required=True, help="models:/<name>@<alias> or models:/<name>/<version>")
    parser.add_argument("--format", choices=FORMATS, default="gguf")
    parser.add_argument("--quant", choices=("f16", "q8_0"), default="f16", help="GGUF weight type")
    parser.add_argument("--out", help="output directory (default exports/<name>-v<version>-<format>[-<quant>])")
    parser.add_argument("--items", help="MCQ items to verify on (default: the processed eval split)")
    parser.add_argument("--min-agreement", type=float,
                        help="share of items whose chosen option must match the merged model's (0.99 f16, 0.95 q8_0)")
    parser.add_argument("--greedy-items", type=int, default=4, help="prompts whose greedy generations are compared")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="merge logit check, relative to the largest logit (as `merge`)")
    parser.add_argument("--num-ctx", type=int, default=2048, help="the Modelfile's context length")
    parser.add_argument("--pre-tokenizer", help="llama.cpp pre-tokenizer name for a tokenizer the converter does not "
                                                "recognise (checked by the export's tokenizer check)")
    parser.add_argument("--skip-template-check", action="store_true", help="do not render the Modelfile in Go")
    parser.add_argument("--no-log", action="store_true", help="write --out only; log nothing to the registry")
    args = parser.parse_args(argv)
    params = load_params()
    configure(params)
    report = export_gguf(args, params) if args.format == "gguf" else export_vllm(args, params)
    print(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    run_cli(main)
