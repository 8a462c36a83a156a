"""Task metrics per model: MCQ accuracy (per category, Wilson interval), generation, robustness, chat scores.

Each function returns `<model>_<metric>` values named in pipeline/metric_catalog.py, plus per-item columns
for reports/predictions.jsonl.
"""

from __future__ import annotations

import math
from collections import defaultdict

from pipeline.config import Params
from pipeline.data.formats import Example, normalised
from pipeline.evaluation.scoring import (
    choose,
    generate,
    masked_logprobs,
    option_logprobs,
    parse_option,
)
from pipeline.evaluation.statistics import accuracy_ci95, clustered_ci95, mean, paired_comparison
from pipeline.metric_catalog import PAIRED_COMPARISONS, paired_key
from pipeline.modeling.chat_template import encode_chat


def by_category(examples: list[Example], correct: list[bool]) -> dict[str, float]:
    """Overall and per-category share of True (when examples carry a category)."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for example, ok in zip(examples, correct, strict=True):
        groups["all"].append(ok)
        if example.category is not None:
            groups[str(example.category)].append(ok)
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def mcq_metrics(name: str, model, tokenizer, examples, stop_ids, params) -> tuple[dict, dict]:
    """Log-likelihood accuracy (per category), generation exact match and EOS-stop rate.

    Greedy generation costs a prompt pass plus one step per new token for every item, more than the scoring
    itself: `evaluate.generation_items` limits it to the first N items (the same items for every model);
    the other items' generations are null in the predictions."""
    predictions = choose(option_logprobs(model, tokenizer, examples, params.evaluate.batch_size))
    accuracy = by_category(examples, [p == e.answer for p, e in zip(predictions, examples, strict=True)])
    generated = examples[: params.evaluate.generation_items]
    generations = generate(model, tokenizer, generated, stop_ids, params)
    low, high = accuracy_ci95(sum(p == e.answer for p, e in zip(predictions, examples, strict=True)), len(examples))
    metrics = {f"{name}_accuracy": accuracy.pop("all"), **{f"{name}_accuracy_{c}": v for c, v in accuracy.items()},
               f"{name}_acc_ci95_low": low, f"{name}_acc_ci95_high": high,
               f"{name}_generation_em": mean([parse_option(g["text"], e) == e.answer
                                              for g, e in zip(generations, generated, strict=True)]),
               f"{name}_eos_rate": mean([g["stopped"] for g in generations])}
    texts = [g["text"] for g in generations] + [None] * (len(examples) - len(generated))
    per_item = {f"{name}_prediction": predictions, f"{name}_generation": texts}
    return metrics, per_item


def robustness_metrics(name: str, model, tokenizer, examples: list[Example], params: Params,
                       clean_correct: list[bool] | None = None) -> dict:
    """Log-likelihood accuracy of `name` on the perturbed copies of mcq `examples` (`evaluate.robustness`):
    pooled, with a 95 % interval that resamples items (each item's copies together), and per perturbation,
    plus each copy's item count; {} when off. With `clean_correct` (the model's results on `examples`), also
    its clean accuracy on the same items weighted as their copies, so a drop compares like with like.

    The copies depend only on the items, `seed`, the task template and the robustness params, so every
    model (and a benchmark script passing any name) is scored on the very same perturbed items."""
    from pipeline.data.perturb import perturbed_examples

    robustness = params.evaluate.robustness
    copies = {kind: perturbed_examples(examples, kind, params.seed, params.task, robustness.typo_rate)
              for kind in robustness.perturbations}
    items = [e for kind in copies for e in copies[kind]]
    if not items:
        return {}
    predictions = choose(option_logprobs(model, tokenizer, items, params.evaluate.batch_size))  # one batched pass
    correct = [p == e.answer for p, e in zip(predictions, items, strict=True)]
    by_item: dict[str, list[bool]] = defaultdict(list)
    for example, ok in zip(items, correct, strict=True):
        by_item[example.id].append(ok)  # a copy keeps its item's id
    low, high = clustered_ci95(list(by_item.values()), params.seed)
    metrics = {f"{name}_robust_accuracy": mean(correct), f"{name}_robust_acc_ci95_low": low,
               f"{name}_robust_acc_ci95_high": high}
    if clean_correct is not None:
        clean = dict(zip((e.id for e in examples), clean_correct, strict=True))
        metrics[f"{name}_robust_clean_accuracy"] = mean(clean[e.id] for e in items)
    start = 0
    for kind, copy in copies.items():
        if copy:
            metrics[f"{name}_robust_accuracy_{kind}"] = mean(correct[start:start + len(copy)])
        metrics[f"robust_n_items_{kind}"] = len(copy)
        start += len(copy)
    return metrics


def chat_metrics(name: str, model, tokenizer, examples, stop_ids, params) -> tuple[dict, dict]:
    """Loss/perplexity on the held-out assistant tokens; exact match and ROUGE-L of greedy answers; EOS rate."""
    from rouge_score import rouge_scorer

    sequences = [encode_chat(tokenizer, e.messages)[-1] for e in examples]
    scored = masked_logprobs(model, tokenizer, sequences, params.evaluate.batch_size)
    loss = -sum(total for total, _ in scored) / max(1, sum(n for _, n in scored))
    generations = generate(model, tokenizer, examples, stop_ids, params)
    references = [e.messages[-1]["content"].strip() for e in examples]
    # Whitespace tokens: the default ROUGE tokenizer keeps only [a-z0-9] and would erase Hangul.
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=WhitespaceTokenizer())
    rouge = [scorer.score(ref, g["text"])["rougeL"].fmeasure for ref, g in zip(references, generations, strict=True)]
    exact = [normalised(g["text"]) == normalised(ref) for ref, g in zip(references, generations, strict=True)]
    metrics = {f"{name}_answer_loss": loss, f"{name}_answer_ppl": math.exp(loss),
               f"{name}_generation_em": mean(exact), f"{name}_rougeL": mean(rouge),
               f"{name}_eos_rate": mean([g["stopped"] for g in generations])}
    return metrics, {f"{name}_generation": [g["text"] for g in generations]}


def paired_metrics(examples: list[Example], per_item: dict, seed: int) -> dict[str, float]:
    """tuned vs base and tuned vs champion on the same mcq items (pipeline/metric_catalog.py PAIRED_STATS)."""
    correct = {name: [p == e.answer for p, e in zip(per_item[f"{name}_prediction"], examples, strict=True)]
               for name in {n for pair in PAIRED_COMPARISONS for n in pair} if f"{name}_prediction" in per_item}
    out = {}
    for first, second in PAIRED_COMPARISONS:
        if first in correct and second in correct:
            stats = paired_comparison(correct[first], correct[second], seed)
            out |= {paired_key(first, second, stat): stats[key] for stat, key in (
                ("acc_diff", "diff"), ("acc_diff_ci95_low", "diff_ci95_low"), ("acc_diff_ci95_high", "diff_ci95_high"),
                ("mcnemar_p", "mcnemar_p"), ("wins", "wins"), ("losses", "losses"))}
    return out


class WhitespaceTokenizer:
    def tokenize(self, text: str) -> list[str]:
        return normalised(text).split()
