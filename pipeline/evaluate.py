"""Stage `evaluate`: held-out accuracy of base, DAPT and tuned model; perplexity on held-out text.

MCQ accuracy is by log-likelihood: each option's answer tokens (the option number the assistant
would write) are scored after the chat prompt, in one batched forward pass per group of items, and
the most likely option is the prediction. Separately, greedy generation within a token budget gives
the exact match of the parsed answer and the share of generations that stop at EOS (a model that
never stops is a common failure). Perplexity on held-out domain text shows the DAPT effect; on
general text it shows forgetting. All models are loaded with the
same quantization the adapter was trained under, so the comparison is like for like.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

import torch

from pipeline.config import Params, load_params, run_cli
from pipeline.data import mcq_prompt, read_jsonl, read_lines
from pipeline.modeling import device_of, load_causal_lm, load_tokenizer, resolve_model
from pipeline.tracking import stage_run


@torch.no_grad()
def option_logprobs(model, tokenizer, items: list[dict], params: Params) -> list[list[float]]:
    """Sum of log-probs of each option's answer tokens (e.g. "3" then EOS) given the chat prompt."""
    device = device_of(model)
    n = params.task.num_choices
    # Continuations are the assistant's answer strings; EOS is included so "1" and "10" differ.
    answers = [tokenizer(str(k), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for k in range(1, n + 1)]
    scores: list[list[float]] = []
    batch_size = params.evaluate.batch_size
    for start in range(0, len(items), batch_size):
        seqs, spans = [], []
        for item in items[start:start + batch_size]:
            prompt = tokenizer.apply_chat_template(mcq_prompt(item, params.task), add_generation_prompt=True,
                                                   tokenize=True, return_dict=True)["input_ids"]
            for answer in answers:
                seqs.append(prompt + answer)
                spans.append((len(prompt), len(answer)))
        width = max(len(s) for s in seqs)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
        attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        logprobs = torch.log_softmax(model(input_ids=input_ids, attention_mask=attention).logits.float(), dim=-1)
        for row, (prompt_len, answer_len) in enumerate(spans):
            positions = torch.arange(prompt_len - 1, prompt_len + answer_len - 1, device=device)
            targets = input_ids[row, prompt_len:prompt_len + answer_len]
            total = logprobs[row, positions, targets].sum().item()
            if row % n == 0:
                scores.append([])
            scores[-1].append(total)
    return scores


@torch.no_grad()
def perplexity(model, tokenizer, lines: list[str], block_size: int) -> float:
    """exp(mean token NLL) over the text packed into blocks of block_size tokens."""
    device = device_of(model)
    ids: list[int] = []
    for line in lines:
        ids.extend(tokenizer(line, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, block_size):
        block = torch.tensor([ids[start:start + block_size + 1]], device=device)
        if block.shape[1] < 2:
            break
        logits = model(input_ids=block[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0], block[0, 1:], reduction="sum")
        nll += loss.item()
        count += block.shape[1] - 1
    return math.exp(nll / count)


@torch.no_grad()
def generate_answers(model, tokenizer, items: list[dict], params: Params) -> list[dict]:
    """Greedy generation after the chat prompt, within `evaluate.max_new_tokens`: parsed answer, EOS stop."""
    device = device_of(model)
    budget = params.evaluate.max_new_tokens
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues on the right
    results = []
    try:
        for start in range(0, len(items), params.evaluate.batch_size):
            chunk = items[start:start + params.evaluate.batch_size]
            prompts = [tokenizer.apply_chat_template(mcq_prompt(item, params.task), add_generation_prompt=True,
                                                     tokenize=False) for item in chunk]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=budget, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            for item, row in zip(chunk, out[:, enc["input_ids"].shape[1]:].tolist(), strict=True):
                stopped = tokenizer.eos_token_id in row
                text = tokenizer.decode(row[: row.index(tokenizer.eos_token_id)] if stopped else row,
                                        skip_special_tokens=True)
                match = re.search(r"\d+", text)
                parsed = int(match.group()) if match else None
                results.append({"text": text, "parsed": parsed, "stopped": stopped,
                                "correct": parsed == int(item["answer"])})
    finally:
        tokenizer.padding_side = side
    return results


def choose(scores: list[list[float]]) -> list[int]:
    """The 1-based option with the highest log-likelihood, per item."""
    return [max(range(len(s)), key=s.__getitem__) + 1 for s in scores]


def accuracy_report(items: list[dict], scores: list[list[float]]) -> tuple[dict, list[int]]:
    """Overall and per-type accuracy (when items carry a `type`), plus the predictions."""
    predictions = choose(scores)
    by_type: dict[str, list[bool]] = defaultdict(list)
    for item, pred in zip(items, predictions):
        correct = pred == int(item["answer"])
        by_type["all"].append(correct)
        if "type" in item:
            by_type[str(item["type"])].append(correct)
    return {k: sum(v) / len(v) for k, v in sorted(by_type.items())}, predictions


def evaluate_models(params: Params) -> tuple[dict, list[dict]]:
    """Metrics of base / dapt / tuned on the same items, and per-item predictions."""
    from peft import PeftModel

    items = read_jsonl(params.data.eval)[: params.evaluate.max_eval_items]
    domain, general = read_lines(params.data.domain_eval), read_lines(params.data.general_eval)
    load = dict(quantization=params.sft.quantization, double_quant=params.sft.double_quant,
                compute_dtype=params.sft.compute_dtype)
    dapt_is_base = resolve_model(params.dapt.out_dir) == resolve_model(params.base.out_dir)
    tokenizer = load_tokenizer(params.sft.out_dir)  # the adapter's tokenizer carries the trained template

    metrics: dict = {"n_items": len(items)}
    per_model_preds, per_model_generations = {}, {}
    models = [("base", params.base.out_dir)] + ([] if dapt_is_base else [("dapt", params.dapt.out_dir)])
    for name, path in models + [("tuned", params.dapt.out_dir)]:
        model = load_causal_lm(path, **load)
        if name == "tuned":
            model = PeftModel.from_pretrained(model, params.sft.out_dir)
        model.eval()
        acc, preds = accuracy_report(items, option_logprobs(model, tokenizer, items, params))
        per_model_preds[name] = preds
        metrics[f"{name}_accuracy"] = acc.pop("all")
        metrics.update({f"{name}_accuracy_{t}": v for t, v in acc.items()})
        generations = generate_answers(model, tokenizer, items, params)
        per_model_generations[name] = generations
        metrics[f"{name}_generation_em"] = sum(g["correct"] for g in generations) / len(generations)
        metrics[f"{name}_eos_rate"] = sum(g["stopped"] for g in generations) / len(generations)
        metrics[f"{name}_ppl_domain"] = perplexity(model, tokenizer, domain, params.evaluate.ppl_block_size)
        metrics[f"{name}_ppl_general"] = perplexity(model, tokenizer, general, params.evaluate.ppl_block_size)
        del model
    if dapt_is_base:
        metrics["dapt_ppl_domain"], metrics["dapt_ppl_general"] = metrics["base_ppl_domain"], metrics["base_ppl_general"]
    metrics["accuracy_gain"] = metrics["tuned_accuracy"] - metrics["base_accuracy"]
    metrics["dapt_domain_ppl_reduction"] = 1 - metrics["dapt_ppl_domain"] / metrics["base_ppl_domain"]
    metrics["dapt_general_ppl_change"] = metrics["dapt_ppl_general"] / metrics["base_ppl_general"] - 1
    # Forgetting of what is shipped (DAPT + adapter), relative to the base.
    metrics["tuned_general_ppl_change"] = metrics["tuned_ppl_general"] / metrics["base_ppl_general"] - 1
    predictions = [
        {"id": item["id"], "type": item.get("type"), "answer": int(item["answer"]),
         **{f"{name}_prediction": preds[i] for name, preds in per_model_preds.items()},
         **{f"{name}_generation": gens[i]["text"] for name, gens in per_model_generations.items()}}
        for i, item in enumerate(items)
    ]
    return metrics, predictions


def accuracy_figure(metrics: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("base", "dapt", "tuned") if f"{n}_accuracy" in metrics]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.barh(names, [metrics[f"{n}_accuracy"] for n in names], color=["#999", "#6a9", "#36c"][: len(names)])
    ax.set(xlim=(0, 1), xlabel="held-out accuracy", title="MCQ accuracy by model")
    fig.tight_layout()
    return fig


def main() -> None:
    import mlflow

    params = load_params()
    metrics_path, preds_path, plot_path = Path("metrics/eval.json"), Path("reports/predictions.jsonl"), Path("plots/accuracy.csv")
    with stage_run(params, "evaluate"):
        metrics, predictions = evaluate_models(params)
        for path in (metrics_path, preds_path, plot_path):
            path.parent.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        preds_path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions), encoding="utf-8")
        plot_path.write_text("model,accuracy\n" + "".join(
            f"{n},{metrics[f'{n}_accuracy']:.4f}\n" for n in ("base", "dapt", "tuned") if f"{n}_accuracy" in metrics))
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(preds_path), "evaluation")
        mlflow.log_artifact(str(metrics_path), "evaluation")
        mlflow.log_figure(accuracy_figure(metrics), "plots/accuracy.png")
    width = max(len(k) for k in metrics)
    print("\n".join(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in metrics.items()))


if __name__ == "__main__":
    run_cli(main)
