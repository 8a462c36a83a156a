"""Merge the adapter into its base: `python -m pipeline.commands.merge [--out models/merged]`.

`merge_and_unload` folds the LoRA weights into an unquantized copy of the base (compute dtype from
params) and saves a full model directory (safetensors + tokenizer). Before anything is written, the
merged model's logits are compared with base+adapter on a batch of held-out prompts; a difference
above `--tolerance` times the largest logit (at least 1) stops with nothing written. The check is logged to MLflow.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.cli import cli_parser, run_cli
from pipeline.config import load_params
from pipeline.data.formats import prompt_of, read_examples
from pipeline.modeling.loading import (
    load_tokenizer,
    save_atomically,
)
from pipeline.modeling.merging import merged_model
from pipeline.modeling.precision import trained_precision
from pipeline.tracking import stage_run


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path, prompts: list[list[dict]],
                  compute_dtype: str, tolerance: float) -> float:
    """Merge, check logits against base+adapter, save; return the max abs logit difference."""
    tokenizer = load_tokenizer(adapter_dir)
    merged, diff = merged_model(base_dir, adapter_dir, tokenizer, prompts, compute_dtype, tolerance)
    save_atomically(out_dir, merged, tokenizer)
    return diff


def main(argv: list[str] | None = None) -> None:
    parser = cli_parser(__doc__, "python -m pipeline.commands.merge")
    parser.add_argument("--out", default="models/merged", help="output model directory")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="max abs logit difference allowed, relative to the largest logit (float32: merging reorders the sums)")
    parser.add_argument("--n-prompts", type=int, default=8)
    args = parser.parse_args(argv)
    import mlflow

    params = load_params()
    eval_examples = read_examples(params.validation.out_dir, "eval", params.validation.max_record_bytes)
    prompts = [prompt_of(e) for e in eval_examples[: args.n_prompts]]
    with stage_run(params, "merge"):
        diff = merge_adapter(Path(params.dapt.out_dir), Path(params.sft.out_dir), Path(args.out), prompts,
                             trained_precision(params).sft.compute_dtype, args.tolerance)
        mlflow.log_params({"merge.tolerance": args.tolerance, "merge.n_prompts": len(prompts), "merge.out": args.out})
        mlflow.log_metric("merge_max_abs_logit_diff", diff)
    print(f"merge: {args.out} written; max abs logit difference vs base+adapter {diff:.3g} (tolerance {args.tolerance})")


if __name__ == "__main__":
    run_cli(main)
