"""Stage `evaluate`: held-out scores of base, DAPT and tuned model; perplexity on held-out text.

Reads only the validated data (data/processed) and refuses an adapter whose chat template differs
from the one the data was validated with. MCQ accuracy is by log-likelihood: each option's answer
tokens (exactly the tokens the trainer learned, see `option_sequences`) are scored after the chat
prompt, in batched forward passes, and the most likely option is the prediction; per-category
accuracy when items carry a category. Other chat formats get the loss/perplexity of the held-out
assistant tokens and exact match / ROUGE-L (rouge-score) of greedy answers. For every format, greedy
generation within a token budget gives the share of answers that stop at a stop token (a model that
never stops is a common failure). Perplexity on held-out domain text shows the DAPT effect; on
general text it shows forgetting. All models are loaded with the
same quantization the adapter was trained under, so the comparison is like for like.
Robustness (mcq only, `evaluate.robustness`): the same accuracy on seeded perturbed copies of the items
(options shuffled, typos, a distractor sentence: pipeline/perturb.py) for base, tuned and champion, and
`robustness_drop`, the tuned model's accuracy lost to them.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

from pipeline.chat import (
    Encoded,
    encode_chat,
    render,
    require_fingerprint,
    stop_token_ids,
)
from pipeline.config import Params, load_params, run_cli
from pipeline.formats import Example, normalised, prompt_of, read_examples, read_texts
from pipeline.modeling import device_of, document_ids, load_causal_lm, load_tokenizer, no_grad, resolve_model
from pipeline.tracking import stage_run


MODELS = ("base", "dapt", "tuned", "champion")
CHAMPION_FILE = "reports/champion.json"  # which champion was re-scored here (read by the register stage)
COLORS = {"base": "#999", "dapt": "#6a9", "tuned": "#36c", "champion": "#c63"}


def option_sequences(tokenizer, example: Example) -> list[Encoded]:
    """The chat answered with each option number; the trainable tokens are what gets scored.

    Scoring exactly the tokens the trainer learned (answer plus the template's end-of-turn marker, and
    whatever a template puts before the answer, like Qwen3's empty think block) keeps the comparison
    right for every template, and the end marker keeps "1" and "10" apart.
    """
    prompt = prompt_of(example)
    return [encode_chat(tokenizer, prompt + [{"role": "assistant", "content": str(k)}])[-1]
            for k in range(1, len(example.choices) + 1)]


@no_grad
def masked_logprobs(model, tokenizer, sequences: list[Encoded], batch_size: int) -> list[tuple[float, int]]:
    """(sum of log-probs, token count) of the masked tokens of each sequence, in right-padded batches.

    Batches are formed longest first (the results come back in the input order), so a batch holds sequences
    of similar length and little of each forward pass is spent on padding. The LM head runs only at the
    positions that predict a scored token (`logits_to_keep` with those positions, the union over the
    batch): an answer is a few tokens, so this skips almost all of the vocabulary projection and softmax,
    and the model's own head (Gemma's logit soft-capping included) still computes them."""
    import torch

    device = device_of(model)
    scored = [[i for i, bit in enumerate(s.assistant_masks) if bit and i > 0] for s in sequences]
    config = getattr(model, "active_peft_config", None)
    offset = config.num_virtual_tokens if config is not None and config.is_prompt_learning else 0
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i].input_ids))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(sequences)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        chunk = [sequences[i] for i in rows]
        width = max(len(s.input_ids) for s in chunk)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([s.input_ids + [pad] * (width - len(s.input_ids)) for s in chunk], device=device)
        attention = torch.tensor([[1] * len(s.input_ids) + [0] * (width - len(s.input_ids)) for s in chunk],
                                 device=device)
        # A prompt-tuning adapter prepends its virtual tokens: its outputs are that many positions later.
        keep = sorted({p - 1 + offset for i in rows for p in scored[i]}) or [0]  # (a chunk with nothing to score)
        column = {p: j for j, p in enumerate(keep)}
        logits = model(input_ids=input_ids, attention_mask=attention,
                       logits_to_keep=torch.tensor(keep, device=device)).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # [batch, len(keep), vocab]
        for row, index in enumerate(rows):
            positions = torch.tensor(scored[index], device=device, dtype=torch.long)
            columns = torch.tensor([column[p - 1 + offset] for p in scored[index]], device=device, dtype=torch.long)
            out[index] = (logprobs[row, columns, input_ids[row, positions]].sum().item(), len(scored[index]))
    return out


def shared_prefix(sequences: list[Encoded]) -> int:
    """How many leading tokens all options of an item share, stopping before the first scored token."""
    first = min(next(i for i, bit in enumerate(s.assistant_masks) if bit and i > 0) for s in sequences)
    for n, column in enumerate(zip(*(s.input_ids[:first] for s in sequences))):
        if len(set(column)) > 1:
            return n
    return first


def prefix_sharing_fits(model, per_item: list[list[Encoded]]) -> bool:
    """Whether the KV-cached scorer gives the plain scorer's numbers for this model: not for a prompt-learning
    adapter (its virtual tokens come before the cache), and only while a sliding-window model's window covers
    every sequence (the cache's padding gap would otherwise shift the window)."""
    config = getattr(model, "active_peft_config", None)
    if config is not None and config.is_prompt_learning:
        return False
    window = getattr(model.config.get_text_config(), "sliding_window", None)
    if window is None or not per_item:
        return True
    prefixes = [shared_prefix(seqs) for seqs in per_item]
    tails = max(len(s.input_ids) - n for seqs, n in zip(per_item, prefixes, strict=True) for s in seqs)
    return max(prefixes) + tails <= window  # the widest cache a batch can have


@no_grad
def shared_prompt_logprobs(model, tokenizer, per_item: list[list[Encoded]], batch_size: int) -> list[list[float]]:
    """Per item, each option's summed log-prob of its scored tokens, with the prompt run once for all options.

    The options of an item differ only after the prompt: one forward pass over `batch_size` prompts (right
    padded, longest first) fills a KV cache, which is then repeated once per option, and a second pass runs just
    the options' own few tokens on it (their position ids continue each prompt; the padding gap stays masked).
    The first answer token is predicted by the prompt pass's last position. For BoolQ's two options that halves
    the tokens through the model, for ARC's four it quarters them, and the numbers are the plain scorer's."""
    import torch
    from transformers import DynamicCache

    device = device_of(model)
    pad = tokenizer.pad_token_id
    prefix = [shared_prefix(seqs) for seqs in per_item]
    scored = [[[p for p, bit in enumerate(s.assistant_masks) if bit and p > 0] for s in seqs] for seqs in per_item]
    order = sorted(range(len(per_item)), key=lambda i: -prefix[i])
    out: list[list[float]] = [[] for _ in per_item]
    for start in range(0, len(order), batch_size):
        items = order[start:start + batch_size]
        width = max(prefix[i] for i in items)
        prompt_mask = torch.tensor([[1] * prefix[i] + [0] * (width - prefix[i]) for i in items], device=device)
        prompt_ids = torch.tensor([per_item[i][0].input_ids[:prefix[i]] + [pad] * (width - prefix[i]) for i in items],
                                  device=device)
        last = sorted({prefix[i] - 1 for i in items})
        cache = DynamicCache()  # plain layers: a config-made cache would crop a sliding window's layers
        logits = model(input_ids=prompt_ids, attention_mask=prompt_mask, past_key_values=cache, use_cache=True,
                       logits_to_keep=torch.tensor(last, device=device)).logits
        columns = torch.tensor([last.index(prefix[i] - 1) for i in items], device=device)
        first = torch.log_softmax(logits[torch.arange(len(items), device=device), columns].float(), dim=-1)
        rows = [(b, i, k) for b, i in enumerate(items) for k in range(len(per_item[i]))]
        # Each option's tokens after the prompt, up to its last scored token.
        tails = [per_item[i][k].input_ids[prefix[i]:scored[i][k][-1]] for _, i, k in rows]
        length = max(1, max(len(t) for t in tails))
        cache.batch_select_indices(torch.tensor([b for b, _, _ in rows], device=device))
        tail_ids = torch.tensor([t + [pad] * (length - len(t)) for t in tails], device=device)
        tail_mask = torch.tensor([[1] * len(t) + [0] * (length - len(t)) for t in tails], device=device)
        positions = torch.tensor([[prefix[i] + j for j in range(length)] for _, i, _ in rows], device=device)
        keep = sorted({p - 1 - prefix[i] for _, i, k in rows for p in scored[i][k] if p > prefix[i]}) or [0]
        logits = model(input_ids=tail_ids, attention_mask=torch.cat([prompt_mask[[b for b, _, _ in rows]], tail_mask], 1),
                       position_ids=positions, past_key_values=cache, use_cache=True,
                       logits_to_keep=torch.tensor(keep, device=device)).logits
        rest = torch.log_softmax(logits.float(), dim=-1)  # [option rows, len(keep), vocab]
        for r, (b, i, k) in enumerate(rows):
            ids = per_item[i][k].input_ids
            out[i].append(sum((first[b, ids[p]] if p == prefix[i] else rest[r, keep.index(p - 1 - prefix[i]), ids[p]]).item()
                              for p in scored[i][k]))
    return out


def option_logprobs(model, tokenizer, examples: list[Example], batch_size: int) -> list[list[float]]:
    """Per MCQ example, the log-likelihood of each option's answer: the prompt shared by all options of an item
    is run once (`shared_prompt_logprobs`) where that gives the same numbers, else every option is a full
    sequence in the batched scorer."""
    per_item = [option_sequences(tokenizer, e) for e in examples]
    if prefix_sharing_fits(model, per_item):
        return shared_prompt_logprobs(model, tokenizer, per_item, batch_size)
    flat = masked_logprobs(model, tokenizer, [s for seqs in per_item for s in seqs], batch_size)
    scores, start = [], 0
    for seqs in per_item:
        scores.append([total for total, _ in flat[start:start + len(seqs)]])
        start += len(seqs)
    return scores


@no_grad
def perplexity(model, tokenizer, lines: list[str], block_size: int) -> float:
    """exp(mean token NLL) over the text packed into blocks of block_size tokens."""
    import torch

    device = device_of(model)
    ids: list[int] = []
    for line in lines:
        ids.extend(document_ids(tokenizer, line))  # as DAPT packs them
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


@no_grad
def generate(model, tokenizer, examples: list[Example], stop_ids: set[int], params: Params) -> list[dict]:
    """Greedy generation after each chat prompt within `evaluate.max_new_tokens`: the text, and whether it stopped."""
    device = device_of(model)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues on the right
    results = []
    try:
        for start in range(0, len(examples), params.evaluate.batch_size):
            chunk = examples[start:start + params.evaluate.batch_size]
            prompts = [render(tokenizer, prompt_of(e), generation_prompt=True) for e in chunk]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=params.evaluate.max_new_tokens, do_sample=False,
                                 eos_token_id=sorted(stop_ids), pad_token_id=tokenizer.pad_token_id)
            for row in out[:, enc["input_ids"].shape[1]:].tolist():
                end = next((i for i, t in enumerate(row) if t in stop_ids), None)
                text = tokenizer.decode(row if end is None else row[:end], skip_special_tokens=True)
                results.append({"text": text.strip(), "stopped": end is not None})
    finally:
        tokenizer.padding_side = side
    return results


def parse_option(text: str) -> int | None:
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


def choose(scores: list[list[float]]) -> list[int]:
    """The 1-based option with the highest log-likelihood, per item."""
    return [max(range(len(s)), key=s.__getitem__) + 1 for s in scores]


def by_category(examples: list[Example], correct: list[bool]) -> dict[str, float]:
    """Overall and per-category share of True (when examples carry a category)."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for example, ok in zip(examples, correct, strict=True):
        groups["all"].append(ok)
        if example.category is not None:
            groups[str(example.category)].append(ok)
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def accuracy_ci95(correct: int, n: int) -> tuple[float, float]:
    """The Wilson score 95 % interval of an accuracy of correct/n (scipy's binomtest)."""
    from scipy.stats import binomtest

    ci = binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


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
    from pipeline.perturb import perturbed_examples

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


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def evaluate_models(params: Params) -> tuple[dict, list[dict], dict]:
    """Metrics of base / dapt / tuned (and the champion) on the same held-out items, per-item predictions,
    and the record of which champion was scored."""
    from peft import PeftModel

    processed = params.validation.out_dir
    limit = params.validation.max_record_bytes
    examples = read_examples(processed, "eval", limit)[: params.evaluate.max_eval_items]
    domain, general = read_texts(processed, "domain_eval", limit), read_texts(processed, "general_eval", limit)
    load = dict(quantization=params.sft.quantization, double_quant=params.sft.double_quant,
                compute_dtype=params.sft.compute_dtype)
    dapt_is_base = resolve_model(params.dapt.out_dir) == resolve_model(params.base.out_dir)
    tokenizer = load_tokenizer(params.sft.out_dir)  # the adapter's tokenizer carries the trained template
    require_fingerprint(processed, tokenizer, f"evaluate ({params.sft.out_dir})")
    stop_ids = stop_token_ids(params.base.out_dir, tokenizer)
    task_metrics = mcq_metrics if params.data.eval.format == "mcq" else chat_metrics
    robust = params.data.eval.format == "mcq"  # only mcq items have options and passages to perturb

    metrics: dict = {"n_items": len(examples)}
    per_item: dict[str, list] = {}
    models = [("base", params.base.out_dir)] + ([] if dapt_is_base else [("dapt", params.dapt.out_dir)])
    for name, path in models + [("tuned", params.dapt.out_dir)]:
        model = load_causal_lm(path, **load)
        if name == "tuned":
            model = PeftModel.from_pretrained(model, params.sft.out_dir)
        model.eval()
        found, items = task_metrics(name, model, tokenizer, examples, stop_ids, params)
        metrics |= found
        per_item |= items
        if robust and name != "dapt":  # the gate compares tuned with base and champion; dapt is compared by none
            metrics |= robustness_metrics(name, model, tokenizer, examples, params)
        metrics[f"{name}_ppl_domain"] = perplexity(model, tokenizer, domain, params.evaluate.ppl_block_size)
        metrics[f"{name}_ppl_general"] = perplexity(model, tokenizer, general, params.evaluate.ppl_block_size)
        del model
    found, items, champion = evaluate_champion(params, examples, domain, general, stop_ids, task_metrics, processed)
    if found:
        metrics |= found
        per_item |= items
    if dapt_is_base:
        metrics["dapt_ppl_domain"], metrics["dapt_ppl_general"] = metrics["base_ppl_domain"], metrics["base_ppl_general"]
    gate = "accuracy" if params.data.eval.format == "mcq" else "rougeL"
    metrics[f"{gate}_gain"] = metrics[f"tuned_{gate}"] - metrics[f"base_{gate}"]
    if "tuned_robust_accuracy" in metrics:
        metrics["robustness_drop"] = metrics["tuned_accuracy"] - metrics["tuned_robust_accuracy"]
    metrics["dapt_domain_ppl_reduction"] = 1 - metrics["dapt_ppl_domain"] / metrics["base_ppl_domain"]
    metrics["dapt_general_ppl_change"] = metrics["dapt_ppl_general"] / metrics["base_ppl_general"] - 1
    # Forgetting of what is shipped (DAPT + adapter), relative to the base.
    metrics["tuned_general_ppl_change"] = metrics["tuned_ppl_general"] / metrics["base_ppl_general"] - 1
    predictions = [{"id": e.id, "source": e.source, "category": e.category,
                    **({"answer": e.answer} if e.answer is not None else {"reference": e.messages[-1]["content"]}),
                    **{key: values[i] for key, values in per_item.items()}}
                   for i, e in enumerate(examples)]
    return metrics, predictions, champion


def evaluate_champion(params: Params, examples, domain, general, stop_ids, task_metrics, processed):
    """The registry's current champion on the same items, when there is one it can be compared on.

    Returns (metrics, per-item, record) or (None, None, record): no registry model yet, or a champion
    whose chat template or task params differ from this run's (its numbers would not be comparable).
    `record` (reports/champion.json) says which version was scored, or why none was; the register stage
    uses the re-scored numbers only for that very version."""
    import mlflow

    from pipeline.data import DataError
    from pipeline.registry import load_registered, version_task

    uri = f"models:/{params.registry.model_name}@champion"
    try:
        model, tokenizer, version, *_ = load_registered(uri)
        require_fingerprint(processed, tokenizer, f"champion version {version.version}")
        if params.data.eval.format == "mcq" and version_task(version) not in (None, params.task):
            raise DataError(f"champion version {version.version} was trained with other task params "
                            "(system prompt / user template): its prompts differ from this run's")
    except (DataError, mlflow.exceptions.MlflowException) as exc:
        reason = str(exc).splitlines()[0][:200]
        print(f"evaluate: champion not evaluated ({reason})")
        return None, None, {"scored": False, "reason": reason}
    found, items = task_metrics("champion", model, tokenizer, examples, stop_ids, params)
    if params.data.eval.format == "mcq":
        found |= {k: v for k, v in robustness_metrics("champion", model, tokenizer, examples, params).items()
                  if k.startswith("champion_")}  # the item counts are this run's, already reported
    found["champion_ppl_domain"] = perplexity(model, tokenizer, domain, params.evaluate.ppl_block_size)
    found["champion_ppl_general"] = perplexity(model, tokenizer, general, params.evaluate.ppl_block_size)
    record = {"scored": True, "model_name": version.name, "version": str(version.version),
              "adapter_sha256": version.tags.get("adapter_sha256"), "n_items": len(examples), "metrics": found}
    found = {**found, "champion_version": int(version.version)}
    return found, items, record


def score_name(params: Params) -> str:
    """The per-model score of the task: accuracy for MCQ, ROUGE-L for free-form chats."""
    return "accuracy" if params.data.eval.format == "mcq" else "rougeL"


def score_figure(metrics: dict, score: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in MODELS if f"{n}_{score}" in metrics]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.barh(names, [metrics[f"{n}_{score}"] for n in names], color=[COLORS[n] for n in names])
    ax.set(xlim=(0, 1), xlabel=f"held-out {score}", title=f"{score} by model")
    fig.tight_layout()
    return fig


def main() -> None:
    import mlflow

    params = load_params()
    metrics_path, preds_path, plot_path = Path("metrics/eval.json"), Path("reports/predictions.jsonl"), Path("plots/accuracy.csv")
    champion_path = Path(CHAMPION_FILE)
    score = score_name(params)
    with stage_run(params, "evaluate"):
        metrics, predictions, champion = evaluate_models(params)
        for path in (metrics_path, preds_path, plot_path, champion_path):
            path.parent.mkdir(parents=True, exist_ok=True)
        champion_path.write_text(json.dumps(champion, indent=2) + "\n", encoding="utf-8")
        metrics_path.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        preds_path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions), encoding="utf-8")
        plot_path.write_text("model,score\n" + "".join(
            f"{n},{metrics[f'{n}_{score}']:.4f}\n" for n in MODELS if f"{n}_{score}" in metrics))
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(preds_path), "evaluation")
        mlflow.log_artifact(str(metrics_path), "evaluation")
        mlflow.log_figure(score_figure(metrics, score), f"plots/{score}.png")
    width = max(len(k) for k in metrics)
    print("\n".join(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in metrics.items()))


if __name__ == "__main__":
    run_cli(main)
