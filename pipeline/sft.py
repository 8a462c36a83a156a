"""Stage `sft`: QLoRA supervised fine-tuning with assistant-only loss on the chat template.

The model (the DAPT output, or the base when DAPT is off) is loaded through bitsandbytes (nf4/fp4
with optional double quant, or LLM.int8, or unquantized for plain LoRA), prepared with
`prepare_model_for_kbit_training`, and trained with TRL's SFTTrainer and a peft LoraConfig.

Loss falls on the assistant turns only, for every template: the validated chats (data/processed)
are tokenized here with `pipeline.chat.encode_chat`, which finds each answer span from the template's
own rendering (real templates have no `{% generation %}` markers, and TRL cannot patch them all), and
go to SFTTrainer pre-tokenized with their `assistant_masks`. The label audit in the validate stage
ran the same function. The chat template must be the one the data was validated with (fingerprint).
The output is an adapter directory (with the tokenizer and template) that plain
`PeftModel.from_pretrained` loads.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.chat import chat_tokenizer, encode_chat, require_fingerprint
from pipeline.config import Params, load_params, run_cli
from pipeline.formats import Example, read_examples
from pipeline.modeling import load_causal_lm, save_atomically
from pipeline.tracking import log_loss_curve, loss_history, stage_run


def training_rows(examples: list[Example], tokenizer) -> list[dict]:
    """Token ids and assistant-only masks of every example (a chat may give one sequence per answer)."""
    return [{"input_ids": enc.input_ids, "assistant_masks": enc.assistant_masks}
            for e in examples for enc in encode_chat(tokenizer, e.messages)]


def train_adapter(model_dir: Path, examples: list[Example], tokenizer, params: Params, out_dir: Path) -> list[dict]:
    """Train a LoRA adapter on the items and save it (atomically) to out_dir; return the loss log."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    sft = params.sft
    # seed
    set_seed(params.seed)
    # data: pre-tokenized with the assistant-only masks
    dataset = Dataset.from_list(training_rows(examples, tokenizer))
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
    processed = params.validation.out_dir
    examples = read_examples(processed, "train")
    tokenizer = chat_tokenizer(params.dapt.out_dir, params.task.chat_template)
    require_fingerprint(processed, tokenizer, "sft")
    with stage_run(params, "sft"):
        mlflow.log_params({f"sft.{k}": v for k, v in params.sft.model_dump().items() if k != "lora"})
        mlflow.log_params({f"sft.lora.{k}": str(v) for k, v in params.sft.lora.model_dump().items()})
        log = train_adapter(Path(params.dapt.out_dir), examples, tokenizer, params, out_dir)
        log_loss_curve(log, "train_loss", Path("plots/sft_loss.csv"), "SFT training loss (answer tokens)")
    print(f"sft: adapter written to {out_dir}; final loss {log[-1]['loss']:.3f}" if log else "sft: done")


if __name__ == "__main__":
    run_cli(main)
