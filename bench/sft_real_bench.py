"""SFT tokens/s and peak memory on SmolLM2-135M-Instruct, side by side on the same sequences:

- `present`: the stage as it was (params-real.yaml before `auto`: nf4 + double quant, float32 compute, gradient
  checkpointing, TRL's LM head over every position);
- `auto`: the stage now (`sft.compute_dtype/quantization: auto`, resolved on this machine; the LM head only at
  labelled positions; gradient checkpointing as `--checkpointing` says);
- `nf4`: the stage now, but nf4 + double quant instead of what `auto` chose (quantization's own cost);
- `plain`: a plain TRL script given the dtype and quantization `auto` chose (TRL's own head).

    .venv/bin/python -m pipeline.stages.import_data boolq --out /tmp/boolq --eval-items 400 --validation-items 100
    .venv/bin/python bench/sft_real_bench.py --mcq /tmp/boolq/train.jsonl --model models/base \
        --params params-real.yaml [--steps 6] [--warmup 1] [--out bench/results-sft-real.json]

(`--model`: a SmolLM2 base directory, as the `base` stage writes it with `base.model: smollm2-135m-instruct`;
`--params`: a profile overlaid on params.yaml.) Every side: the same examples in the same order, the profile's
LoRA r/alpha/targets, lr, batch and max_length, no evaluation or checkpoints, an fp32 adapter. Each side runs in
its own process (its own peak RSS); tokens are counted by bench/throughput.py (non-pad tokens of every training
forward) over the steps after the warm-up. MFU: 6 x (parameters outside the embeddings) x tokens/s over the
float32 matmul peak measured in the same run (pipeline/modeling/precision.py's timing, 2048 x 2048).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def profile_params(spec: dict):
    import yaml

    from pipeline.commands.run_profile import merged
    from pipeline.config import Params

    tree = merged(yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8")),
                  yaml.safe_load(Path(spec["params"]).read_text(encoding="utf-8")))
    params = Params.model_validate(tree)
    return params.model_copy(update={"sft": params.sft.model_copy(update=spec["overrides"])})


def bench_examples(spec: dict, params):
    from pipeline.data.formats import to_example
    from pipeline.data.readers import read_records

    return [to_example(r, "mcq", params.task) for r in read_records(spec["mcq"])]


def pipeline_side(spec: dict) -> dict:
    from pipeline.modeling.chat_template import chat_tokenizer
    from pipeline.modeling.precision import resolve
    from pipeline.training import sft as recipe
    from pipeline.training.preflight import preflight
    from throughput import Throughput

    params = profile_params(spec)
    examples = bench_examples(spec, params)
    tokenizer = chat_tokenizer(spec["model"], params.task.chat_template)
    lengths = [len(r["input_ids"]) for r in recipe.training_rows(examples, tokenizer)]
    sft, record = resolve(params.sft, lambda s: preflight(spec["model"], s, lengths, []).estimate_gb)
    params = params.model_copy(update={"sft": sft})
    if not spec["compact_head"]:  # the stage as it was: TRL's head over every position on a CPU
        recipe.lm_head_at_labels_only = lambda on=True: None
    meter = Throughput(warmup=spec["warmup"])
    recipe.train_adapter(Path(spec["model"]), examples, tokenizer, params, Path(spec["out"]), callbacks=[meter])
    return meter.result() | {"compute_dtype": sft.compute_dtype, "quantization": sft.quantization,
                             "gradient_checkpointing": sft.gradient_checkpointing, "precision": record["reason"]}


def plain_side(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from throughput import Throughput

    params = profile_params(spec)
    s = params.sft
    examples = bench_examples(spec, params)
    rows = [{"prompt": e.messages[:-1], "completion": e.messages[-1:]} for e in examples]
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    dtype = getattr(torch, s.compute_dtype)
    quantized = {} if s.quantization == "none" else {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=s.quantization, bnb_4bit_use_double_quant=s.double_quant,
        bnb_4bit_compute_dtype=dtype)}
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype, **quantized)
    config = SFTConfig(output_dir=spec["out"], max_steps=s.max_steps, per_device_train_batch_size=s.batch_size,
                       gradient_accumulation_steps=s.gradient_accumulation_steps, learning_rate=s.learning_rate,
                       lr_scheduler_type=s.lr_scheduler, warmup_steps=s.warmup_ratio, max_length=s.max_length,
                       gradient_checkpointing=s.gradient_checkpointing, bf16=s.compute_dtype == "bfloat16", use_cpu=not torch.cuda.is_available(),
                       save_strategy="no", report_to="none", seed=params.seed, data_seed=params.seed,
                       logging_steps=s.logging_steps)
    lora = LoraConfig(r=s.lora.r, lora_alpha=s.lora.alpha, lora_dropout=s.lora.dropout,
                      target_modules=s.lora.target_modules, bias="none", task_type="CAUSAL_LM")
    meter = Throughput(warmup=spec["warmup"])
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lora, callbacks=[meter])
    for p in (p for p in trainer.model.parameters() if p.requires_grad):  # the fp32 adapter, as the pipeline has
        p.data = p.data.float()
    trainer.train()
    return meter.result()


def body_parameters(model_dir: str) -> int:
    """Parameters outside the input embeddings and the LM head (6N's N: the head runs only at labelled positions)."""
    from pipeline.training.preflight import meta_model

    model, _ = meta_model(model_dir)
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--model", default="models/base")
    parser.add_argument("--mcq", help="mcq records (an imported train.jsonl); required")
    parser.add_argument("--params", default="params-real.yaml")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on the auto side")
    parser.add_argument("--out", default=str(BENCH / "results-sft-real.json"))
    parser.add_argument("--worker", nargs=2, metavar=("SIDE", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path[:0] = [str(ROOT), str(BENCH)]
    if args.worker:
        side, spec_file = args.worker
        spec = json.loads(Path(spec_file).read_text(encoding="utf-8"))
        result = {"pipeline": pipeline_side, "plain": plain_side}[side](spec)
        Path(spec["result"]).write_text(json.dumps(result, indent=2), encoding="utf-8")
        return
    if not args.mcq:
        parser.error("--mcq is required")
    from pipeline.modeling.precision import matmul_gflops

    common = {"max_steps": args.steps, "eval_steps": None, "save_steps": None, "early_stopping_patience": None}
    present = common | {"quantization": "nf4", "double_quant": True, "compute_dtype": "float32",
                        "gradient_checkpointing": True}
    now = common | {"quantization": "auto", "compute_dtype": "auto", "gradient_checkpointing": args.checkpointing}
    results = {"load_average": os.getloadavg()[0], "float32_matmul_gflops": matmul_gflops("float32", n=2048, seconds=2)}
    with tempfile.TemporaryDirectory() as tmp:
        quantized = now | {"quantization": "nf4", "double_quant": True}
        for side, worker, overrides, compact in (("present", "pipeline", present, False),
                                                 ("auto", "pipeline", now, True), ("nf4", "pipeline", quantized, True),
                                                 ("plain", "plain", None, None)):
            if overrides is None:  # plain TRL with what auto chose
                overrides = common | {k: results["auto"][k] for k in ("compute_dtype", "quantization",
                                                                      "gradient_checkpointing")}
            spec = {"params": str(Path(args.params).resolve()), "mcq": str(Path(args.mcq).resolve()),
                    "model": str(Path(args.model).resolve()), "out": f"{tmp}/{side}", "result": f"{tmp}/{side}.json",
                    "overrides": overrides, "warmup": args.warmup, "compact_head": compact}
            Path(f"{tmp}/{side}-spec.json").write_text(json.dumps(spec), encoding="utf-8")
            subprocess.run([sys.executable, __file__, "--worker", worker, f"{tmp}/{side}-spec.json"], check=True,
                           env={**os.environ, **OFFLINE})
            results[side] = json.loads(Path(spec["result"]).read_text(encoding="utf-8"))
    results["load_average_end"] = os.getloadavg()[0]
    key = "tokens_per_s"  # non-pad training tokens per second after the warm-up (bench/throughput.py)
    body = body_parameters(args.model)
    for side in ("present", "auto", "nf4", "plain"):
        results[side]["mfu"] = 6 * body * results[side][key] / (results["float32_matmul_gflops"] * 1e9)
    results["auto_vs_present"] = results["auto"][key] / results["present"][key]
    results["auto_vs_plain"] = results["auto"][key] / results["plain"][key]
    results["auto_vs_nf4"] = results["auto"][key] / results["nf4"][key]
    results["rss_auto_vs_present"] = results["auto"]["peak_rss_mb"] / results["present"]["peak_rss_mb"]
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"{key}: present {results['present'][key]:.1f}, auto {results['auto'][key]:.1f}, plain TRL "
          f"{results['plain'][key]:.1f}, nf4 {results['nf4'][key]:.1f}; auto/present {results['auto_vs_present']:.2f}, auto/plain "
          f"{results['auto_vs_plain']:.2f}; peak RSS auto/present {results['rss_auto_vs_present']:.2f}")


if __name__ == "__main__":
    main()
