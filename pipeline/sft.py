"""Stage `sft`: QLoRA supervised fine-tuning with assistant-only loss on the chat template.

The model (the DAPT output, or the base when DAPT is off) is loaded through bitsandbytes (nf4/fp4
with optional double quant, or LLM.int8, or unquantized for plain LoRA), prepared with
`prepare_model_for_kbit_training`, and trained with TRL's SFTTrainer and a peft LoraConfig.

Loss falls on the assistant answer only. With a template that marks assistant turns with
`{% generation %}` (the built-in default) the data is `messages` + `assistant_only_loss`; real model
templates mostly lack those markers, so for them the same chats go in TRL's conversational
prompt/completion form + `completion_only_loss`, which masks the prompt for any template.
The output is an adapter directory that plain `PeftModel.from_pretrained` loads.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.config import Params, load_params, run_cli
from pipeline.data import mcq_messages, mcq_prompt, read_jsonl
from pipeline.modeling import load_causal_lm, load_tokenizer, save_atomically
from pipeline.tracking import log_loss_curve, loss_history, stage_run


def training_rows(items: list[dict], params: Params, template_has_generation_markers: bool) -> list[dict]:
    if template_has_generation_markers:
        return [{"messages": mcq_messages(item, params.task)} for item in items]
    return [{"prompt": mcq_prompt(item, params.task), "completion": mcq_messages(item, params.task)[-1:]}
            for item in items]


def train_adapter(model_dir: Path, items: list[dict], params: Params, out_dir: Path) -> list[dict]:
    """Train a LoRA adapter on the items and save it (atomically) to out_dir; return the loss log."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    sft = params.sft
    # seed
    set_seed(params.seed)
    # tokenizer and data
    tokenizer = load_tokenizer(model_dir)
    markers = "{% generation %}" in (tokenizer.chat_template or "")
    dataset = Dataset.from_list(training_rows(items, params, markers))
    # model: quantized base + LoRA
    model = load_causal_lm(model_dir, sft.quantization, sft.double_quant, sft.compute_dtype)
    if sft.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=sft.gradient_checkpointing)
    peft_config = LoraConfig(
        r=sft.lora.r, lora_alpha=sft.lora.alpha, lora_dropout=sft.lora.dropout,
        target_modules=sft.lora.target_modules, bias="none", task_type="CAUSAL_LM",
    )
    # trainer
    with tempfile.TemporaryDirectory(prefix="sft-") as work:
        config = SFTConfig(
            output_dir=work,
            max_steps=sft.max_steps,
            per_device_train_batch_size=sft.batch_size,
            gradient_accumulation_steps=sft.gradient_accumulation_steps,
            learning_rate=sft.learning_rate,
            lr_scheduler_type=sft.lr_scheduler,
            warmup_steps=sft.warmup_ratio,
            max_length=sft.max_length,
            assistant_only_loss=markers,
            completion_only_loss=None if markers else True,
            gradient_checkpointing=sft.gradient_checkpointing,
            bf16=sft.compute_dtype == "bfloat16",
            fp16=sft.compute_dtype == "float16",
            use_cpu=not torch.cuda.is_available(),
            logging_steps=sft.logging_steps,
            save_strategy="no",
            report_to="none",
            seed=params.seed,
            data_seed=params.seed,
        )
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config)
        trainable, total = trainer.model.get_nb_trainable_parameters()
        print(f"sft: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
        trainer.train()
    # save: only the adapter (+ tokenizer, so the chat template travels with it)
    save_atomically(out_dir, trainer.model, tokenizer)
    return loss_history(trainer)


def main() -> None:
    import mlflow

    params = load_params()
    out_dir = Path(params.sft.out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    items = read_jsonl(params.data.train)
    with stage_run(params, "sft"):
        mlflow.log_params({f"sft.{k}": v for k, v in params.sft.model_dump().items() if k != "lora"})
        mlflow.log_params({f"sft.lora.{k}": str(v) for k, v in params.sft.lora.model_dump().items()})
        log = train_adapter(Path(params.dapt.out_dir), items, params, out_dir)
        log_loss_curve(log, "train_loss", Path("plots/sft_loss.csv"), "SFT training loss (answer tokens)")
    print(f"sft: adapter written to {out_dir}; final loss {log[-1]['loss']:.3f}" if log else "sft: done")


if __name__ == "__main__":
    run_cli(main)
