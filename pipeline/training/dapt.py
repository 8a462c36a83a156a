"""Optional domain-adaptive continued pretraining on the raw domain corpus.

Causal LM loss over every token of packed blocks of the corpus. `method: full` trains every weight
(the right choice for the small default); `method: lora` trains a LoRA adapter and merges it back,
so the output is always a plain model directory the `sft` stage loads like any base. Disabled, the
stage writes a model_ref.json that hands the base on untouched.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.config import DaptParams, Params
from pipeline.data.formats import prompt_of, read_examples
from pipeline.modeling.chat_template import chat_tokenizer, render
from pipeline.modeling.loading import (
    document_ids,
    load_causal_lm,
    load_tokenizer,
    save_atomically,
)
from pipeline.tracking import loss_history


def task_texts(params: Params) -> list[str]:
    """TAPT: the task's own unlabeled text, i.e. each training chat's prompt without its answer."""
    tokenizer = chat_tokenizer(params.base.out_dir, params.task.chat_template)
    return [render(tokenizer, prompt_of(e), generation_prompt=True)
            for e in read_examples(params.validation.out_dir, "train", params.validation.max_record_bytes)]


def pack_corpus(lines: list[str], tokenizer, block_size: int) -> list[list[int]]:
    """Tokenize every line as a document (`document_ids`: BOS where the tokenizer adds one, EOS after), join them,
    cut into full blocks of block_size tokens."""
    ids: list[int] = []
    for line in lines:
        ids.extend(document_ids(tokenizer, line))
    n_blocks = len(ids) // block_size
    return [ids[i * block_size:(i + 1) * block_size] for i in range(n_blocks)]


def continued_pretraining(base_dir: Path, lines: list[str], dapt: DaptParams, seed: int, out_dir: Path) -> list[dict]:
    """Train on the corpus and save the adapted full model to out_dir; return the loss log."""
    import torch
    from datasets import Dataset
    from transformers import (
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    # seed → data → tokenizer → model → trainer → train → save
    set_seed(seed)
    tokenizer = load_tokenizer(base_dir)
    blocks = pack_corpus(lines, tokenizer, dapt.block_size)
    if not blocks:
        raise SystemExit(f"error: dapt: the domain corpus has fewer than block_size={dapt.block_size} tokens")
    dataset = Dataset.from_dict({"input_ids": blocks})
    model = load_causal_lm(base_dir)
    if dapt.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=dapt.lora_r, lora_alpha=dapt.lora_alpha,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    with tempfile.TemporaryDirectory(prefix="dapt-") as work:
        args = TrainingArguments(
            output_dir=work, max_steps=dapt.max_steps, per_device_train_batch_size=dapt.batch_size,
            learning_rate=dapt.learning_rate, lr_scheduler_type="cosine", warmup_steps=0.05,
            logging_steps=10, save_strategy="no", report_to="none", seed=seed, data_seed=seed,
            use_cpu=not torch.cuda.is_available(), disable_tqdm=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset,
                          data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
        trainer.train()
    model = trainer.model
    if dapt.method == "lora":
        model = model.merge_and_unload()
    save_atomically(out_dir, model, tokenizer)
    return loss_history(trainer)
