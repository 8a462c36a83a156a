"""Stage `sft`: supervised fine-tuning (QLoRA by default) with assistant-only loss on the chat template.

The model (the DAPT output, or the base when DAPT is off) is loaded through bitsandbytes (nf4/fp4
with optional double quant, or LLM.int8, or unquantized for plain LoRA), prepared with
`prepare_model_for_kbit_training`, and trained with TRL's SFTTrainer and a peft config: LoRA
(optionally rsLoRA), DoRA, or prompt tuning.

Loss falls on the assistant turns only, for every template: the validated chats (data/processed)
are tokenized here with `pipeline.modeling.chat_template.encode_chat`, which finds each answer span from the template's
own rendering (real templates have no `{% generation %}` markers, and TRL cannot patch them all), and
go to SFTTrainer pre-tokenized with their `assistant_masks`. The label audit in the validate stage
ran the same function. The chat template must be the one the data was validated with (fingerprint).

Before any weight is loaded, a preflight (pipeline/training/preflight.py) prints parameter counts, a memory
estimate and token counts, and stops when the estimate exceeds `sft.max_memory_gb`.

Checkpoints (every `sft.save_steps`) go to `sft.checkpoint_dir` with the identity of the run (params,
data and base hashes): rerunning after a crash resumes from the last one and ends with the same
adapter bytes as an uninterrupted run; a checkpoint of another run is refused (or, with
`sft.resume: fresh`, discarded). Held-out loss and answer-token accuracy are measured every
`sft.eval_steps` (optionally with early stopping and the best checkpoint) on the validation split, never
on eval: eval reports accuracy and decides promotion, so model selection must not have seen it.
Under `torchrun --nproc_per_node N` or `accelerate launch --config_file configs/accelerate/ddp.yaml` the
same params train data-parallel (gloo on CPUs); only rank 0 writes and logs.

The output is an adapter directory (with the tokenizer and template) that plain
`PeftModel.from_pretrained` loads.

The training recipe is pipeline/training/sft.py; this module reads params and the validated data, calls it and
logs to MLflow.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from pipeline.artifacts import SFT_EVAL_LOSS, SFT_LOSS, SFT_METRICS
from pipeline.cli import run_cli
from pipeline.config import load_params
from pipeline.data.formats import read_examples
from pipeline.errors import DataError
from pipeline.modeling.chat_template import chat_tokenizer, require_fingerprint
from pipeline.modeling.precision import resolve
from pipeline.tracking import log_loss_curve, stage_run
from pipeline.training.preflight import check_budget, preflight
from pipeline.training.sft import (
    is_main_process,
    run_identity,
    train_adapter,
    training_rows,
    validation_examples,
    validation_scores,
)


def main() -> None:
    import mlflow

    params = load_params()
    out_dir, model_dir = Path(params.sft.out_dir), Path(params.dapt.out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    processed = Path(params.validation.out_dir)
    limit = params.validation.max_record_bytes
    examples, eval_examples = read_examples(processed, "train", limit), validation_examples(processed, limit)
    if params.sft.early_stopping_patience and not eval_examples:
        raise DataError(f"{processed}/validation.jsonl is empty: sft.early_stopping_patience needs a validation split "
                        "(set data.validation, or give train more than one record to carve from)")
    tokenizer = chat_tokenizer(model_dir, params.task.chat_template)
    require_fingerprint(processed, tokenizer, "sft")
    # precision (`auto`: measured once per machine class) and preflight: before any weight is loaded
    lengths = [len(r["input_ids"]) for r in training_rows(examples, tokenizer)]
    eval_lengths = [len(r["input_ids"]) for r in training_rows(eval_examples, tokenizer)]
    sft, precision = resolve(params.sft, lambda s: preflight(str(model_dir), s, lengths, eval_lengths).estimate_gb)
    declared, params = params, params.model_copy(update={"sft": sft})
    if is_main_process():
        print(f"sft: compute {sft.compute_dtype}, quantization {sft.quantization} ({precision['reason']})")
    report = preflight(str(model_dir), sft, lengths, eval_lengths)
    if is_main_process():
        print(report.table())
    check_budget(report, sft)
    identity = run_identity(params, model_dir, [processed / "train.jsonl", processed / "validation.jsonl"])
    run = stage_run(declared, "sft") if is_main_process() else contextlib.nullcontext()
    with run:
        if is_main_process():
            mlflow.log_params({f"sft.{k}": str(v) for k, v in sft.model_dump().items() if k not in ("lora", "prompt_tuning", "adversarial")})
            mlflow.log_params({f"sft.adversarial.{k}": str(v) for k, v in sft.adversarial.model_dump().items()})
            mlflow.log_params({f"sft.lora.{k}": str(v) for k, v in sft.lora.model_dump().items()})
            mlflow.log_params({f"preflight.{k}": v for k, v in report.as_dict().items()})
            mlflow.log_params({f"precision.{k}": str(v)[:6000] for k, v in precision.items()})
        logs = train_adapter(model_dir, examples, tokenizer, params, out_dir, eval_examples,
                             Path(sft.checkpoint_dir), identity, precision=precision)
        if is_main_process():
            log_loss_curve(logs["train"], "train_loss", SFT_LOSS, "SFT training loss (answer tokens)")
            log_loss_curve(logs["eval"], "eval_loss", SFT_EVAL_LOSS, "SFT held-out loss (answer tokens)")
            for entry in logs["eval_accuracy"]:
                mlflow.log_metric("eval_answer_token_accuracy", entry["loss"], step=entry["step"])
            for entry in logs["adversarial"]:  # adversarial / clean loss of a batch: above 1, the attack bites
                mlflow.log_metric("adversarial_loss_increase", entry["loss"], step=entry["step"])
            scores = validation_scores(logs, best_loaded=sft.early_stopping_patience is not None)
            SFT_METRICS.parent.mkdir(parents=True, exist_ok=True)
            SFT_METRICS.write_text(json.dumps(scores, indent=2) + "\n", encoding="utf-8")
            mlflow.log_metrics({f"sft_{k}": v for k, v in scores.items()})
    if is_main_process():
        final = logs["train"][-1]["loss"] if logs["train"] else float("nan")
        print(f"sft: adapter written to {out_dir}; final loss {final:.3f}"
              + (f", held-out loss {logs['eval'][-1]['loss']:.3f}" if logs["eval"] else ""))


if __name__ == "__main__":
    run_cli(main)
