"""SFT tokens/s on SmolLM2-135M-Instruct: the pipeline's `sft` stage vs a plain TRL script, same settings.

Run from the directory of a real-profile run (`make real`: models/base is SmolLM2, data/processed holds
the validated BoolQ split, params.yaml the profile):

    .venv/bin/python bench/sft_real_bench.py [--steps 10] [--warmup 2] [--out bench/results-sft-real.json]

Both sides: the same validated examples in the same order, the run's `sft` params (nf4 QLoRA, LoRA r/alpha/
targets, lr, batch, max_length), no evaluation or checkpoints, and an fp32 adapter (TRL casts a quantized
model's adapter to bf16; the plain side casts it back, as the pipeline does), so the ratio measures the
pipeline, not a dtype. The plain side is the textbook TRL recipe for a template without generation
markers: a conversational prompt/completion dataset, loss on the completion only. Each side runs in its
own process; tokens are counted by bench/throughput.py (non-pad tokens of every training forward) over
the steps after the warm-up.
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


def pipeline_side(spec: dict) -> dict:
    from pipeline.modeling.chat_template import chat_tokenizer
    from pipeline.config import load_params
    from pipeline.data.formats import read_examples
    from pipeline.training.sft import train_adapter
    from throughput import Throughput

    params = load_params(Path(spec["params"]))
    params = params.model_copy(update={"sft": params.sft.model_copy(update=spec["overrides"])})
    examples = read_examples(spec["processed"], "train", params.validation.max_record_bytes)
    meter = Throughput(warmup=spec["warmup"])
    train_adapter(Path(spec["model"]), examples, chat_tokenizer(spec["model"], params.task.chat_template), params,
                  Path(spec["out"]), callbacks=[meter])
    return meter.result()


def plain_side(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from pipeline.config import load_params
    from pipeline.data.formats import read_examples
    from throughput import Throughput

    params = load_params(Path(spec["params"]))
    s = params.sft.model_copy(update=spec["overrides"])
    examples = read_examples(spec["processed"], "train", params.validation.max_record_bytes)
    rows = [{"prompt": e.messages[:-1], "completion": e.messages[-1:]} for e in examples]
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=s.quantization, bnb_4bit_use_double_quant=s.double_quant,
        bnb_4bit_compute_dtype=torch.float32))
    config = SFTConfig(output_dir=spec["out"], max_steps=s.max_steps, per_device_train_batch_size=s.batch_size,
                       gradient_accumulation_steps=s.gradient_accumulation_steps, learning_rate=s.learning_rate,
                       lr_scheduler_type=s.lr_scheduler, warmup_steps=s.warmup_ratio, max_length=s.max_length,
                       gradient_checkpointing=s.gradient_checkpointing, bf16=False, use_cpu=not torch.cuda.is_available(),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--model", default="models/base")
    parser.add_argument("--processed", default="data/processed")
    parser.add_argument("--params", default="params.yaml")
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
    overrides = {"max_steps": args.steps, "eval_steps": None, "save_steps": None, "early_stopping_patience": None}
    results = {"load_average": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        for side in ("pipeline", "plain"):
            spec = {"params": str(Path(args.params).resolve()), "processed": str(Path(args.processed).resolve()),
                    "model": str(Path(args.model).resolve()), "out": f"{tmp}/{side}", "result": f"{tmp}/{side}.json",
                    "overrides": overrides, "warmup": args.warmup}
            Path(f"{tmp}/{side}-spec.json").write_text(json.dumps(spec), encoding="utf-8")
            subprocess.run([sys.executable, __file__, "--worker", side, f"{tmp}/{side}-spec.json"], check=True,
                           env={**os.environ, **OFFLINE})
            results[side] = json.loads(Path(spec["result"]).read_text(encoding="utf-8"))
    results["load_average_end"] = os.getloadavg()[0]
    key = "tokens_per_s"  # non-pad training tokens per second after the warm-up (bench/throughput.py)
    results["ratio"] = results["pipeline"][key] / results["plain"][key]
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"{key}: pipeline {results['pipeline'][key]:.1f}, plain TRL {results['plain'][key]:.1f}, "
          f"ratio {results['ratio']:.2f}")


if __name__ == "__main__":
    main()
