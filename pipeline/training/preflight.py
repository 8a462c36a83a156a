"""Preflight for `sft`: parameter counts, a memory estimate and token counts, before any weight is loaded.

The model is instantiated on the `meta` device from its config (no memory, no weights), so the counts
are exact and the check is instant even for a large model. The estimate adds up:
- weights at the chosen quantization: 4-bit linear layers at 0.5 byte per weight plus one fp32 absmax
  per 64 weights (about 1 byte per 64 with double quant), 8-bit at 1 byte plus a row scale, everything
  else (embeddings, norms, the LM head) at the compute dtype;
- the adapter: its weights, gradients and two AdamW moments in fp32 (16 bytes per trainable parameter);
- activations of one micro-batch: about 18 values per hidden unit per token per layer (attention and
  MLP inputs kept for backward) at the compute dtype, or 2 per layer with gradient checkpointing,
  plus the logits and their gradient in fp32 (batch × length × vocab × 8 bytes).
It is an estimate of the steady state (allocator overhead and framework buffers come on top), good to
catch a config that cannot fit, not to size a machine to the last gigabyte.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pipeline.config import SftParams
from pipeline.errors import PreflightError

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Preflight:
    total_params: int
    linear_params: int
    trainable_params: int
    weights_gb: float
    adapter_gb: float
    activations_gb: float
    train_tokens: int
    eval_tokens: int
    max_sequence: int

    @property
    def estimate_gb(self) -> float:
        return self.weights_gb + self.adapter_gb + self.activations_gb

    def as_dict(self) -> dict:
        return {**asdict(self), "estimate_gb": self.estimate_gb}

    def table(self) -> str:
        rows = [("parameters", f"{self.total_params:,}"),
                ("trainable (adapter)", f"{self.trainable_params:,} ({100 * self.trainable_params / self.total_params:.2f}%)"),
                ("weights", f"{self.weights_gb:.3f} GB"), ("adapter + grads + AdamW", f"{self.adapter_gb:.3f} GB"),
                ("activations (one micro-batch)", f"{self.activations_gb:.3f} GB"),
                ("estimated total", f"{self.estimate_gb:.3f} GB"),
                ("tokens train / eval", f"{self.train_tokens:,} / {self.eval_tokens:,}"),
                ("longest sequence", f"{self.max_sequence:,}")]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"preflight: {k:<{width}}  {v}" for k, v in rows)


def meta_model(model_dir: str):
    """The architecture on the meta device: shapes and counts without memory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.modeling.loading import resolve_model

    name, revision = resolve_model(model_dir)
    config = AutoConfig.from_pretrained(name, revision=revision)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config), config


def trainable_count(model, sft: SftParams) -> int:
    """Adapter parameters the method adds to this architecture."""
    import torch

    hidden = model.get_input_embeddings().weight.shape[1]
    if sft.method == "prompt_tuning":
        return sft.prompt_tuning.num_virtual_tokens * hidden
    wanted = sft.lora.target_modules
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is model.get_output_embeddings():
            continue
        if wanted != "all-linear" and name.rsplit(".", 1)[-1] not in wanted:
            continue
        count += sft.lora.r * (module.in_features + module.out_features)
        if sft.method == "dora":
            count += module.out_features  # the magnitude vector
    return count


def preflight(model_dir: str, sft: SftParams, train_lengths: list[int], eval_lengths: list[int]) -> Preflight:
    import torch

    model, config = meta_model(model_dir)
    head = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    total = sum(p.numel() for p in model.parameters())
    other = total - linear
    dtype = DTYPE_BYTES[sft.compute_dtype]
    if sft.quantization in ("nf4", "fp4"):
        linear_bytes = linear * (0.5 + (1 / 64 + 4 / (64 * 256) if sft.double_quant else 4 / 64))
    elif sft.quantization == "int8":
        linear_bytes = linear * 1.0 + linear / max(1, config.hidden_size) * 4
    else:
        linear_bytes = linear * dtype
    trainable = trainable_count(model, sft)
    length = min(sft.max_length, max(train_lengths, default=0)) if not sft.packing else sft.max_length
    tokens = sft.batch_size * length
    per_layer = 2 if sft.gradient_checkpointing else 18
    activations = tokens * config.hidden_size * config.num_hidden_layers * per_layer * dtype
    activations += tokens * config.vocab_size * 8
    return Preflight(total_params=total, linear_params=linear, trainable_params=trainable,
                     weights_gb=(linear_bytes + other * dtype) / GIB, adapter_gb=trainable * 16 / GIB,
                     activations_gb=activations / GIB, train_tokens=sum(train_lengths),
                     eval_tokens=sum(eval_lengths), max_sequence=max(train_lengths, default=0))


def check_budget(report: Preflight, sft: SftParams) -> None:
    if report.estimate_gb > sft.max_memory_gb:
        raise PreflightError(
            f"sft: estimated {report.estimate_gb:.2f} GB (weights {report.weights_gb:.2f} + adapter/optimizer "
            f"{report.adapter_gb:.2f} + activations {report.activations_gb:.2f}) exceeds sft.max_memory_gb="
            f"{sft.max_memory_gb}; lower sft.batch_size or sft.max_length, turn on sft.gradient_checkpointing, "
            "quantize (sft.quantization nf4), or raise the budget")
