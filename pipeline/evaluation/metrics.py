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
from pipeline.evaluation.statistics import accuracy_ci95, mean
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
    """Log-likelihood accuracy (per category), generation exact match and EOS-stop rate."""
    predictions = choose(option_logprobs(model, tokenizer, examples, params.evaluate.batch_size))
    accuracy = by_category(examples, [p == e.answer for p, e in zip(predictions, examples, strict=True)])
    generations = generate(model, tokenizer, examples, stop_ids, params)
    low, high = accuracy_ci95(sum(p == e.answer for p, e in zip(predictions, examples, strict=True)), len(examples))
    metrics = {f"{name}_accuracy": accuracy.pop("all"), **{f"{name}_accuracy_{c}": v for c, v in accuracy.items()},
               f"{name}_acc_ci95_low": low, f"{name}_acc_ci95_high": high,
               f"{name}_generation_em": mean([parse_option(g["text"]) == e.answer
                                              for g, e in zip(generations, examples, strict=True)]),
               f"{name}_eos_rate": mean([g["stopped"] for g in generations])}
    per_item = {f"{name}_prediction": predictions, f"{name}_generation": [g["text"] for g in generations]}
    return metrics, per_item


def robustness_metrics(name: str, model, tokenizer, examples: list[Example], params: Params) -> dict:
    """Log-likelihood accuracy of `name` on the perturbed copies of mcq `examples` (`evaluate.robustness`):
    pooled with its Wilson interval and per perturbation, plus each copy's item count; {} when off.

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
    low, high = accuracy_ci95(sum(correct), len(correct))
    metrics = {f"{name}_robust_accuracy": mean(correct), f"{name}_robust_acc_ci95_low": low,
               f"{name}_robust_acc_ci95_high": high}
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


class WhitespaceTokenizer:
    def tokenize(self, text: str) -> list[str]:
        return normalised(text).split()
