"""Folding a LoRA adapter into its base, checked: the merged model's logits against base+adapter's.

Used by `merge` (pipeline/commands/merge.py, which saves the result) and `export` (which converts it to GGUF).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import DataError
from pipeline.modeling.loading import load_causal_lm, no_grad


@no_grad
def merged_model(base: str | Path, adapter_dir: Path, tokenizer, prompts: list[list[dict]], compute_dtype: str,
                 tolerance: float, revision: str | None = None, on_cpu: bool = False):
    """(base with the adapter folded in, max abs logit difference against base+adapter on the prompts); a
    difference above tolerance times the largest logit (at least 1) raises before anything is returned."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_causal_lm(base, compute_dtype=compute_dtype, revision=revision, on_cpu=on_cpu),
                                      str(adapter_dir)).eval()
    batch = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True, padding=True,
                                          return_dict=True, return_tensors="pt")
    reference = model(**batch).logits
    merged = model.merge_and_unload()
    diff = (merged(**batch).logits - reference).abs().max().item()
    scale = max(1.0, reference.abs().max().item())  # float32 reordering errors grow with the logits' size
    if diff > tolerance * scale:
        raise DataError(f"merged logits differ from base+adapter by {diff:.3g} > tolerance {tolerance} x the largest "
                        f"logit {scale:.3g}; nothing written")
    return merged, diff
