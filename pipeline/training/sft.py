"""The SFT recipe: seed, data, model, trainer, train, save (the `sft` stage, pipeline/stages/sft.py, calls it).

The model is loaded through bitsandbytes as `sft.quantization` says and trained with TRL's SFTTrainer and
a peft config (LoRA, rsLoRA, DoRA or prompt tuning), on chats pre-tokenized with their assistant-only masks
(`pipeline.modeling.chat_template.encode_chat`, the function the label audit ran). Checkpoints carry the
run's identity (params, data and base hashes): only the same run resumes, and a resumed run ends with the
same adapter bytes as an uninterrupted one.

It is over 300 lines because the recipe's parts that keep runs exact belong with it: the checkpoint identity and
resume point, the one-kernel rule for 4-bit layers, the fp32 adapter, and the LM head at labelled positions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from pipeline.artifacts import RUN_IDENTITY
from pipeline.config import Params, SftParams
from pipeline.data.formats import Example, read_examples
from pipeline.errors import DataError
from pipeline.modeling.chat_template import encode_chat
from pipeline.modeling.loading import (
    device_of,
    load_causal_lm,
    model_fingerprint,
    resolve_model,
    save_atomically,
)
from pipeline.tracking import loss_history


def training_rows(examples: list[Example], tokenizer) -> list[dict]:
    """Token ids and assistant-only masks of every example (a chat may give one sequence per answer)."""
    return [{"input_ids": enc.input_ids, "assistant_masks": enc.assistant_masks}
            for e in examples for enc in encode_chat(tokenizer, e.messages)]


class StableAdapterConfig:
    """Saved after the adapter: peft writes `target_modules` from a set (e.g. the expansion of all-linear),
    whose order changes with Python's hash seed, so the same adapter would get a different directory hash
    (DVC, lineage tags) in every process. Sorting it keeps the whole directory byte-identical."""

    def save_pretrained(self, directory) -> None:
        path = Path(directory) / "adapter_config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(config.get("target_modules"), list):
            config["target_modules"] = sorted(config["target_modules"])
        path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


class PrecisionRecord:
    """Saved beside the adapter: the compute dtype and quantization it was trained in, and why (precision.json)."""

    def __init__(self, record: dict):
        self.record = record

    def save_pretrained(self, directory) -> None:
        from pipeline.modeling.precision import PRECISION_FILE

        (Path(directory) / PRECISION_FILE).write_text(json.dumps(self.record, indent=2, sort_keys=True) + "\n",
                                                      encoding="utf-8")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def peft_config(sft: SftParams, model_dir: Path):
    from peft import LoraConfig, PromptTuningConfig, PromptTuningInit

    if sft.method == "prompt_tuning":
        init = sft.prompt_tuning.init_text
        return PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=sft.prompt_tuning.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.TEXT if init else PromptTuningInit.RANDOM,
            prompt_tuning_init_text=init, tokenizer_name_or_path=resolve_model(model_dir)[0] if init else None)
    return LoraConfig(r=sft.lora.r, lora_alpha=sft.lora.alpha, lora_dropout=sft.lora.dropout,
                      target_modules=sft.lora.target_modules, use_rslora=sft.lora.use_rslora,
                      use_dora=sft.method == "dora", bias="none", task_type="CAUSAL_LM")


def run_identity(params: Params, model_dir: Path, data_files: list[Path]) -> dict:
    """What a checkpoint must match to be resumed: the training params, the data and the base."""
    relevant = {"seed": params.seed, "sft": params.sft.model_dump(exclude={"resume", "checkpoint_dir", "out_dir"}),
                "chat_template": params.task.chat_template}
    name, revision = resolve_model(model_dir)
    return {"params_sha256": hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest(),
            "data_sha256": hashlib.sha256(b"".join(f.read_bytes() for f in data_files)).hexdigest(),
            "base": f"{model_fingerprint(name)}@{revision}"}


def last_complete_checkpoint(checkpoint_dir: Path) -> str | None:
    """The newest checkpoint whose save finished. Trainer writes trainer_state.json last, so a run killed
    while saving leaves a checkpoint without a readable one: it is skipped, and the one before is used."""
    steps = sorted((int(p.name.split("-")[1]), p) for p in checkpoint_dir.glob("checkpoint-*")
                   if p.name.split("-")[1].isdigit())
    for _, path in reversed(steps):
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            print(f"sft: {path} is incomplete (killed while saving?); skipping it")
            continue
        return str(path)
    return None


STALE_CHECKPOINTS_S = 7 * 24 * 3600  # another run's checkpoints untouched this long are pruned (a killed run's)


def run_checkpoint_dir(checkpoint_root: Path, identity: dict | None) -> Path:
    """Where this run's checkpoints go: a directory per run identity under `sft.checkpoint_dir`, so a run of the
    same identity resumes its own and a run with other params or data starts fresh beside it, never blocked
    by (nor deleting) a killed run's checkpoints. Other identities' directories untouched for a week are
    pruned. Without an identity (benches), the root itself."""
    if not identity:
        return checkpoint_root
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    if checkpoint_root.is_dir() and is_main_process():
        now = time.time()
        for other in checkpoint_root.iterdir():
            if other.name == key or not other.is_dir() or not (other / RUN_IDENTITY).is_file():
                continue  # ours, or not a run's checkpoint directory: left alone
            newest = max((p.stat().st_mtime for p in other.rglob("*")), default=other.stat().st_mtime)
            if now - newest > STALE_CHECKPOINTS_S:
                print(f"sft: pruning {other} (checkpoints of another run, untouched for "
                      f"{(now - newest) / 86400:.0f} days)")
                shutil.rmtree(other, ignore_errors=True)
    return checkpoint_root / key


def resume_point(checkpoint_dir: Path, identity: dict, resume: str) -> str | None:
    """The checkpoint to resume from, None to start fresh; refuses a checkpoint of another run."""
    if resume == "fresh" or not checkpoint_dir.is_dir():
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        return None
    stored = checkpoint_dir / RUN_IDENTITY
    last = last_complete_checkpoint(checkpoint_dir)
    if last is None:
        return None
    found = json.loads(stored.read_text(encoding="utf-8")) if stored.is_file() else {}
    changed = [k for k in identity if found.get(k) != identity[k]]
    if changed:
        raise DataError(f"{checkpoint_dir}: the checkpoints were written by a run with different "
                        f"{', '.join(k.removesuffix('_sha256') for k in changed)}; resuming would mix two runs. "
                        "Set sft.resume: fresh (or delete the directory) to start over")
    return last


def lm_head_at_labels_only(on: bool = True) -> None:
    """Project through the LM head only at the positions that carry a label, on every device.

    TRL's SFTTrainer computes the loss, entropy and token accuracy with its fused LM head, which never builds the
    (batch, length, vocab) logits; but off Triton devices (a CPU) it still projects every position, tile by tile,
    so that accelerators compiling fixed tile shapes (Neuron) do not recompile per batch. Under assistant-only loss a
    few answer tokens per sequence carry labels: on a CPU the head over all positions is most of a step's waste (a
    quarter of SmolLM2's forward FLOPs at 49 k vocabulary, most of Gemma 3's at 262 k) and its tiles most of the
    memory. `compact` is TRL's own code path for CUDA (the same kernel, on the labelled rows only), so loss,
    entropy and accuracy are the same numbers (tests/training/test_lm_head.py compares them). `on=False` restores
    TRL's choice."""
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_pipeline_original_use_triton", trl_utils._use_triton)
    trl_utils._pipeline_original_use_triton = original
    trl_utils._use_triton = (lambda device: device.type in ("cpu", "cuda", "xpu", "mps") or original(device)) \
        if on else original


def train_adapter(model_dir: Path, examples: list[Example], tokenizer, params: Params, out_dir: Path,
                  eval_examples: list[Example] | None = None, checkpoint_dir: Path | None = None,
                  identity: dict | None = None, callbacks: list | None = None, precision: dict | None = None) -> dict:
    """Train an adapter and save it (atomically) to out_dir, with the precision it was trained in
    (precision.json: `precision`, the choice record of pipeline.modeling.precision, or params' own values);
    return the train and eval loss logs."""
    from transformers import set_seed

    sft = params.sft
    # seed
    set_seed(params.seed)
    # data: pre-tokenized with the assistant-only masks
    dataset, eval_dataset = training_datasets(examples, eval_examples if sft.eval_steps else None, tokenizer)
    # model: quantized base (the adapter is added by the trainer from peft_config)
    model = training_model(model_dir, sft)
    # checkpoints: resume only a run of the same identity
    work = run_checkpoint_dir(Path(checkpoint_dir) if checkpoint_dir else Path(out_dir).parent / f".{Path(out_dir).name}-work",
                              identity)
    resume = resume_point(work, identity or {}, sft.resume) if sft.save_steps else None
    work.mkdir(parents=True, exist_ok=True)
    if identity is not None and is_main_process():
        (work / RUN_IDENTITY).write_text(json.dumps(identity, indent=2) + "\n", encoding="utf-8")
    # trainer
    trainer = sft_trainer(model, model_dir, tokenizer, dataset, eval_dataset, params, work, callbacks)
    report_setup(trainer, sft, resume)
    # train
    trainer.train(resume_from_checkpoint=resume)
    # save: only the adapter (+ tokenizer, so the chat template travels with it)
    if is_main_process():
        record = precision or {"compute_dtype": sft.compute_dtype, "quantization": sft.quantization,
                               "reason": "set in params"}
        save_atomically(out_dir, trainer.model, tokenizer, StableAdapterConfig(), PrecisionRecord(record))
        shutil.rmtree(work, ignore_errors=True)  # finished: the checkpoints have served
        if work.parent.is_dir() and not any(work.parent.iterdir()):
            work.parent.rmdir()
    return training_logs(trainer)


def training_datasets(examples: list[Example], eval_examples: list[Example] | None, tokenizer):
    from datasets import Dataset

    dataset = Dataset.from_list(training_rows(examples, tokenizer))
    eval_dataset = Dataset.from_list(training_rows(eval_examples, tokenizer)) if eval_examples else None
    return dataset, eval_dataset


def training_model(model_dir: Path, sft: SftParams):
    """The base loaded for training: quantized as `sft.quantization` says, prepared for k-bit training."""
    from peft import prepare_model_for_kbit_training

    model = load_causal_lm(model_dir, sft.quantization, sft.double_quant, sft.compute_dtype)
    if sft.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=sft.gradient_checkpointing)
    # On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weights for a faster bf16 kernel at its first
    # no-grad forward and runs that kernel from then on. Left to itself that happens at the first held-out eval, so
    # a run resumed after a checkpoint would train with the other kernel until its next eval and end with other
    # bytes (measured: the resume test failed on such a CPU). One kernel for the whole run keeps resume exact: the
    # fast one, repacked now by a no-grad pass before any step, when the compute dtype is bfloat16 (what `auto`
    # picks where bf16 is fast); else the plain kernel, the repacking switched off.
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    if sft.compute_dtype == "bfloat16" and any(m.support_avx512bf16_for_cpu for m in layers):
        import torch

        with torch.no_grad():
            model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device_of(model)))
        print(f"sft: bitsandbytes' AVX512-BF16 kernel for all {len(layers)} 4-bit layers (repacked before training)")
    else:
        for module in layers:
            module.support_avx512bf16_for_cpu = False
    return model


def sft_config(params: Params, work: Path, evaluates: bool):
    import torch
    from trl import SFTConfig

    sft = params.sft
    return SFTConfig(
        output_dir=str(work),
        max_steps=sft.max_steps,
        per_device_train_batch_size=sft.batch_size,
        per_device_eval_batch_size=sft.batch_size,
        gradient_accumulation_steps=sft.gradient_accumulation_steps,
        learning_rate=sft.learning_rate,
        lr_scheduler_type=sft.lr_scheduler,
        warmup_steps=sft.warmup_ratio,
        max_length=sft.max_length,
        packing=sft.packing,
        packing_strategy=sft.packing_strategy,
        neftune_noise_alpha=sft.neftune_noise_alpha,
        gradient_checkpointing=sft.gradient_checkpointing,
        bf16=sft.compute_dtype == "bfloat16",
        fp16=sft.compute_dtype == "float16",
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        logging_steps=sft.logging_steps,
        eval_strategy="steps" if evaluates else "no",
        eval_steps=sft.eval_steps,
        save_strategy="steps" if sft.save_steps else "no",
        save_steps=sft.save_steps or 500,
        save_total_limit=2 if sft.early_stopping_patience is None else None,
        load_best_model_at_end=sft.early_stopping_patience is not None,
        metric_for_best_model="eval_loss",
        report_to="none",
        seed=params.seed,
        data_seed=params.seed,
        disable_tqdm=not is_main_process(),
    )


def sft_trainer(model, model_dir: Path, tokenizer, dataset, eval_dataset, params: Params, work: Path,
                callbacks: list | None):
    """TRL's SFTTrainer (or its adversarial subclass) with the peft config, held-out metrics and early stopping."""
    from transformers import EarlyStoppingCallback
    from trl import SFTTrainer

    sft = params.sft
    lm_head_at_labels_only()
    config = sft_config(params, work, eval_dataset is not None)
    callbacks = list(callbacks or []) + ([EarlyStoppingCallback(sft.early_stopping_patience)]
                                         if sft.early_stopping_patience else [])
    trainer_class, extra = SFTTrainer, {}
    if sft.adversarial.method:  # FGM / PGD on the input embeddings (pipeline/training/adversarial.py)
        from pipeline.training.adversarial import AdversarialSFTTrainer

        trainer_class, extra = AdversarialSFTTrainer, {"adversarial": sft.adversarial}
    trainer = trainer_class(model=model, args=config, train_dataset=dataset, eval_dataset=eval_dataset,
                            processing_class=tokenizer, peft_config=peft_config(sft, model_dir), callbacks=callbacks,
                            **extra)
    # TRL casts a quantized model's adapter to bf16 (QLoRA paper, a GPU memory saving), but a resumed run
    # reloads the checkpointed adapter in fp32 (peft's autocast_adapter_dtype), so an interrupted run
    # would end with other bytes (measured: max |diff| ~1e-3 after 8 steps). The adapter's master weights
    # stay fp32 in every run; compute still runs in sft.compute_dtype.
    for param in trainer.model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return trainer


def report_setup(trainer, sft: SftParams, resume: str | None) -> None:
    """What is trained, how much of it, at what cost: printed once (rank 0)."""
    if not is_main_process():
        return
    trainable, total = trainer.model.get_nb_trainable_parameters()
    print(f"sft: {sft.method}, {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)"
          + (f"; resuming from {resume}" if resume else ""))
    if sft.adversarial.method:
        passes = 2 if sft.adversarial.method == "fgm" else sft.adversarial.steps + 1
        print(f"sft: adversarial {sft.adversarial.method} on the input embeddings (epsilon {sft.adversarial.epsilon}): "
              f"{passes} forward/backward passes per micro-batch, about {passes}x the time of a plain step")
    print(f"sft: world size {trainer.args.world_size} ({trainer.args.parallel_mode.value}), "
          f"{trainer.args.train_batch_size * trainer.args.world_size * sft.gradient_accumulation_steps} "
          "examples per optimizer step")


def training_logs(trainer) -> dict:
    """Train loss, held-out loss and answer accuracy, and the adversarial loss increase, per logged step."""
    history = trainer.state.log_history
    return {"train": loss_history(trainer),
            "eval": [{"step": e["step"], "loss": e["eval_loss"]} for e in history if "eval_loss" in e],
            # TRL's token accuracy from the fused head: the share of labelled (answer) tokens predicted exactly
            "eval_accuracy": [{"step": e["step"], "loss": e["eval_mean_token_accuracy"]}
                              for e in history if "eval_mean_token_accuracy" in e],
            "adversarial": [{"step": e["step"], "loss": e["adversarial_loss_increase"]}
                            for e in history if "adversarial_loss_increase" in e]}


def validation_scores(logs: dict, best_loaded: bool) -> dict[str, float]:
    """The written adapter's held-out (validation split) loss and answer-token accuracy: of the best evaluation
    when the trainer reloaded the best checkpoint, else of the last. {} when nothing was evaluated."""
    if not logs["eval"]:
        return {}
    pick = min(logs["eval"], key=lambda e: e["loss"]) if best_loaded else logs["eval"][-1]
    accuracy = {e["step"]: e["loss"] for e in logs["eval_accuracy"]}
    return {"validation_loss": pick["loss"], "validation_step": float(pick["step"]),
            **({"validation_answer_accuracy": accuracy[pick["step"]]} if pick["step"] in accuracy else {})}


def validation_examples(processed: Path, limit: int) -> list[Example]:
    """The held-out split for eval_steps, early stopping and the best checkpoint (empty when none was carved)."""
    path = processed / "validation.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: missing (data validated before the validation split existed); rerun the validate stage")
    return read_examples(processed, "validation", limit) if path.stat().st_size else []
