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
(options shuffled, typos, a distractor sentence: pipeline/data/perturb.py) for base, tuned and champion, and
`robustness_drop`, the tuned model's accuracy lost to them.

Scoring is pipeline/evaluation/ (scoring, metrics, statistics); this module loads the models, calls it and
writes the outputs named in pipeline/artifacts.py.
"""

from __future__ import annotations

import json

from pipeline.artifacts import CHAMPION_SCORED, EVAL_METRICS, PREDICTIONS, SCORES, write_text_atomically
from pipeline.cli import run_cli
from pipeline.config import Params, load_params
from pipeline.data.formats import read_examples, read_texts
from pipeline.evaluation.metrics import chat_metrics, mcq_metrics, paired_metrics, robustness_metrics
from pipeline.evaluation.scoring import choose, document_perplexity, option_logprobs, perplexity
from pipeline.modeling.chat_template import require_fingerprint, stop_token_ids
from pipeline.modeling.loading import load_causal_lm, load_tokenizer, resolve_model
from pipeline.modeling.precision import trained_precision
from pipeline.tracking import stage_run

MODELS = ("base", "dapt", "tuned", "champion")
COLORS = {"base": "#999", "dapt": "#6a9", "tuned": "#36c", "champion": "#c63"}


def evaluate_models(params: Params) -> tuple[dict, list[dict], dict]:
    """Metrics of base / dapt / tuned (and the champion) on the same held-out items, per-item predictions,
    and the record of which champion was scored."""
    from peft import PeftModel

    params = trained_precision(params)  # the base loaded as the adapter was trained (sft `auto` included)
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
        if name == "tuned" and params.sft.compute_dtype != "float32" and "tuned_prediction" in items:
            metrics |= float32_agreement(path, params, load, tokenizer, examples, items["tuned_prediction"])
        if robust and name != "dapt":  # the gate compares tuned with base and champion; dapt is compared by none
            metrics |= robustness_metrics(name, model, tokenizer, examples, params, clean_correct(examples, items, name))
        metrics |= {f"{name}_{key}": value for key, value in perplexities(model, tokenizer, domain, general,
                                                                           params).items()}
        del model
    found, items, champion = evaluate_champion(params, examples, domain, general, stop_ids, task_metrics, processed)
    if found:
        metrics |= found
        per_item |= items
    if dapt_is_base:
        metrics |= {f"dapt_{key}": metrics[f"base_{key}"] for key in PERPLEXITIES}
    metrics |= comparisons(params, metrics, examples, per_item, champion)
    predictions = [{"id": e.id, "source": e.source, "category": e.category,
                    **({"answer": e.answer} if e.answer is not None else {"reference": e.messages[-1]["content"]}),
                    **{key: values[i] for key, values in per_item.items()}}
                   for i, e in enumerate(examples)]
    return metrics, predictions, champion


PERPLEXITIES = ("ppl_domain", "ppl_general", "ppl_domain_doc", "ppl_general_doc")


def perplexities(model, tokenizer, domain: list[str], general: list[str], params: Params) -> dict[str, float]:
    """Perplexity on the domain and general held-out text, packed into blocks as DAPT trains (`ppl_*`) and per
    document from its BOS (`ppl_*_doc`); computed once when a profile names one file for both."""
    block, batch = params.evaluate.ppl_block_size, params.evaluate.batch_size
    found = {"ppl_domain": perplexity(model, tokenizer, domain, block),
             "ppl_domain_doc": document_perplexity(model, tokenizer, domain, block, batch)}
    same = general == domain
    found["ppl_general"] = found["ppl_domain"] if same else perplexity(model, tokenizer, general, block)
    found["ppl_general_doc"] = found["ppl_domain_doc"] if same else document_perplexity(model, tokenizer, general,
                                                                                        block, batch)
    return found


def float32_agreement(path, params: Params, load: dict, tokenizer, examples, chosen: list[int]) -> dict:
    """How many items the tuned model answers differently when scored in float32 (same weights, same
    quantization): what scoring in the faster dtype costs, counted on this run's items."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_causal_lm(path, **{**load, "compute_dtype": "float32"}),
                                      params.sft.out_dir).eval()
    float32 = choose(option_logprobs(model, tokenizer, examples, params.evaluate.batch_size))
    changed = sum(a != b for a, b in zip(chosen, float32, strict=True))
    print(f"evaluate: scored in {params.sft.compute_dtype}, {changed} of {len(examples)} items choose another option "
          "than in float32")
    return {"tuned_float32_changed_choices": changed}


def clean_correct(examples, per_item: dict, name: str) -> list[bool] | None:
    """Which items `name` answered right (mcq), for robustness on the same items; None for chat formats."""
    predictions = per_item.get(f"{name}_prediction")
    return None if predictions is None else [p == e.answer for p, e in zip(predictions, examples, strict=True)]


def comparisons(params: Params, metrics: dict, examples, per_item: dict, champion: dict) -> dict:
    """What the models' own metrics say together: gains, paired tests on the same items, perplexity changes.

    The paired tuned-vs-champion numbers also go into the champion record (reports/champion.json), so the
    register stage uses them only while that very version is still the champion."""
    gate = score_name(params)
    found = {f"{gate}_gain": metrics[f"tuned_{gate}"] - metrics[f"base_{gate}"]}
    if "tuned_robust_accuracy" in metrics:  # clean vs perturbed accuracy on the same items
        found["robustness_drop"] = metrics["tuned_robust_clean_accuracy"] - metrics["tuned_robust_accuracy"]
    if params.data.eval.format == "mcq":
        paired = paired_metrics(examples, per_item, params.seed)
        found |= paired
        if champion.get("scored"):
            champion["paired"] = {k: v for k, v in paired.items() if k.startswith("tuned_vs_champion_")}
    found["dapt_domain_ppl_reduction"] = 1 - metrics["dapt_ppl_domain"] / metrics["base_ppl_domain"]
    # The same per document from its BOS: the part of the reduction that is domain, not packing format.
    found["dapt_domain_doc_ppl_reduction"] = 1 - metrics["dapt_ppl_domain_doc"] / metrics["base_ppl_domain_doc"]
    found["dapt_general_ppl_change"] = metrics["dapt_ppl_general"] / metrics["base_ppl_general"] - 1
    # Forgetting of what is shipped (DAPT + adapter), relative to the base.
    found["tuned_general_ppl_change"] = metrics["tuned_ppl_general"] / metrics["base_ppl_general"] - 1
    return found


def evaluate_champion(params: Params, examples, domain, general, stop_ids, task_metrics, processed):
    """The registry's current champion on the same items, when there is one it can be compared on.

    Returns (metrics, per-item, record) or (None, None, record): no registry model yet, or a champion
    whose chat template or task params differ from this run's (its numbers would not be comparable).
    `record` (reports/champion.json) says which version was scored, or why none was; the register stage
    uses the re-scored numbers only for that very version."""
    import mlflow
    from pipeline.errors import DataError
    from pipeline.registry.read import load_registered, version_task

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
        found |= {k: v for k, v in robustness_metrics("champion", model, tokenizer, examples, params,
                                                      clean_correct(examples, items, "champion")).items()
                  if k.startswith("champion_")}  # the item counts are this run's, already reported
    found |= {f"champion_{key}": value for key, value in perplexities(model, tokenizer, domain, general,
                                                                        params).items()}
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
    metrics_path, preds_path, plot_path, champion_path = EVAL_METRICS, PREDICTIONS, SCORES, CHAMPION_SCORED
    score = score_name(params)
    with stage_run(params, "evaluate"):
        metrics, predictions, champion = evaluate_models(params)
        # each file whole (temp file + rename): a crash mid-write never leaves a truncated one for the next reader
        write_text_atomically(champion_path, json.dumps(champion, indent=2) + "\n")
        write_text_atomically(preds_path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
        write_text_atomically(plot_path, "model,score\n" + "".join(
            f"{n},{metrics[f'{n}_{score}']:.4f}\n" for n in MODELS if f"{n}_{score}" in metrics))
        write_text_atomically(metrics_path, json.dumps(metrics, indent=2) + "\n")  # last: the stage's summary
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(preds_path), "evaluation")
        mlflow.log_artifact(str(metrics_path), "evaluation")
        mlflow.log_figure(score_figure(metrics, score), f"plots/{score}.png")
    width = max(len(k) for k in metrics)
    print("\n".join(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in metrics.items()))


if __name__ == "__main__":
    run_cli(main)
