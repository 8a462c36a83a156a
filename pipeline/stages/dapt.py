"""Stage `dapt`: optional domain-adaptive continued pretraining on the raw domain corpus.

Causal LM loss over every token of packed blocks of the corpus. `method: full` trains every weight
(the right choice for the small default); `method: lora` trains a LoRA adapter and merges it back,
so the output is always a plain model directory the `sft` stage loads like any base. Disabled, the
stage writes a model_ref.json that hands the base on untouched.

The training is pipeline/training/dapt.py; this module reads params and the validated corpus, calls it and logs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.artifacts import DAPT_LOSS
from pipeline.cli import run_cli
from pipeline.config import load_params
from pipeline.data.formats import read_texts
from pipeline.modeling.loading import write_model_ref
from pipeline.tracking import log_loss_curve, stage_run, write_loss_csv
from pipeline.training.dapt import continued_pretraining, task_texts


def main() -> None:
    import mlflow

    params = load_params()
    out_dir, base_dir = Path(params.dapt.out_dir), Path(params.base.out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if not params.dapt.enabled:
        shutil.rmtree(out_dir, ignore_errors=True)
        write_model_ref(out_dir, str(base_dir))
        write_loss_csv([], DAPT_LOSS)
        print("dapt: disabled; handing the base on untouched")
        return
    lines = read_texts(params.validation.out_dir, "domain_corpus", params.validation.max_record_bytes)
    if params.dapt.tapt:
        lines += task_texts(params)
    with stage_run(params, "dapt"):
        mlflow.log_params({f"dapt.{k}": v for k, v in params.dapt.model_dump().items()})
        log = continued_pretraining(base_dir, lines, params.dapt, params.seed, out_dir)
        log_loss_curve(log, "dapt_loss", DAPT_LOSS, "DAPT loss (all tokens)")
    print(f"dapt: {params.dapt.method} continued pretraining, {params.dapt.max_steps} steps, "
          f"final loss {log[-1]['loss']:.3f}" if log else "dapt: done")


if __name__ == "__main__":
    run_cli(main)
