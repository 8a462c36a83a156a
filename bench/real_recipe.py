"""Pick a real profile's model, steps and learning rate by measurement: train one adapter with the pipeline's own
recipe (pipeline.training.sft.train_adapter) on an imported set and score base and tuned on held-out items with
the pipeline's scorer (pipeline.evaluation.scoring), printing times and accuracies as one JSON line.

    .venv/bin/python -m pipeline.stages.import_data sciq --out /tmp/sciq --eval-items 300 --validation-items 100
    .venv/bin/python bench/real_recipe.py --data /tmp/sciq --model models/base --profile params-real-sciq.yaml \
        --steps 60 --learning-rate 2e-4 --score-on validation

It scores the validation split by default: the recipe is chosen there, and the eval split stays for the gate.
`--set sft.key=value` overrides any other sft param. Not a test: minutes per run on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.commands.run_profile import merged  # noqa: E402
from pipeline.config import Params  # noqa: E402
from pipeline.data.formats import to_example  # noqa: E402
from pipeline.data.readers import read_records  # noqa: E402
from pipeline.evaluation.scoring import choose, option_logprobs  # noqa: E402
from pipeline.modeling.chat_template import chat_tokenizer  # noqa: E402
from pipeline.modeling.loading import load_causal_lm  # noqa: E402
from pipeline.modeling.precision import resolve  # noqa: E402
from pipeline.training.preflight import preflight  # noqa: E402
from pipeline.training.sft import train_adapter, training_rows  # noqa: E402


def examples(path: Path, params: Params, limit: int | None = None):
    return [to_example(r, "mcq", params.task) for r in read_records(path)][:limit]


def accuracy(model, tokenizer, items, batch_size: int) -> tuple[float, list[int]]:
    picks = choose(option_logprobs(model, tokenizer, items, batch_size))
    hits = [int(p == e.answer) for p, e in zip(picks, items, strict=True)]
    return sum(hits) / len(hits), hits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--profile", type=Path, default=Path("params-real.yaml"))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--learning-rate", type=float, default=2e-4)
    ap.add_argument("--score-on", choices=["validation", "eval"], default="validation")
    ap.add_argument("--score-limit", type=int, default=None)
    ap.add_argument("--skip-base", action="store_true")
    ap.add_argument("--set", action="append", default=[], help="sft.key=value (YAML value)")
    args = ap.parse_args()

    tree = merged(yaml.safe_load(Path("params.yaml").read_text()), yaml.safe_load(args.profile.read_text()))
    tree["sft"] |= {"max_steps": max(args.steps, 1), "learning_rate": args.learning_rate, "eval_steps": None,
                    "save_steps": None, "early_stopping_patience": None}
    for item in args.set:
        key, value = item.split("=", 1)
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = yaml.safe_load(value)
    params = Params.model_validate(tree)
    tokenizer = chat_tokenizer(args.model, params.task.chat_template)
    train = examples(args.data / "train.jsonl", params)
    lengths = [len(r["input_ids"]) for r in training_rows(train, tokenizer)]
    sft, precision = resolve(params.sft, lambda s: preflight(str(args.model), s, lengths, []).estimate_gb)
    params = params.model_copy(update={"sft": sft})
    scored = examples(args.data / f"{args.score_on}.jsonl", params, args.score_limit)
    out: dict = {"data": str(args.data), "model": str(args.model), "steps": args.steps, "lr": args.learning_rate,
                 "sets": args.set, "precision": precision["reason"], "train_items": len(train), "scored_items": len(scored), "score_on": args.score_on}
    batch = params.evaluate.batch_size
    if not args.skip_base:
        start = time.perf_counter()
        base = load_causal_lm(args.model, "none", False, "float32")
        out["base_accuracy"], base_hits = accuracy(base, tokenizer, scored, batch)
        out["base_score_s"] = time.perf_counter() - start
        del base
    if args.steps == 0:  # the base alone
        print(json.dumps(out))
        return
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        logs = train_adapter(args.model, train, tokenizer, params, Path(tmp) / "adapter")
        out["train_s"] = time.perf_counter() - start
        out["final_loss"] = logs["train"][-1]["loss"] if logs["train"] else None
        from peft import PeftModel

        start = time.perf_counter()
        tuned = PeftModel.from_pretrained(load_causal_lm(args.model, sft.quantization, sft.double_quant,
                                                         sft.compute_dtype), Path(tmp) / "adapter")
        out["tuned_accuracy"], tuned_hits = accuracy(tuned.eval(), tokenizer, scored, batch)
        out["tuned_score_s"] = time.perf_counter() - start
    if not args.skip_base:
        out["wins"] = sum(t and not b for t, b in zip(tuned_hits, base_hits, strict=True))
        out["losses"] = sum(b and not t for t, b in zip(tuned_hits, base_hits, strict=True))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
