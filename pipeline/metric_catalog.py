"""The metrics the evaluate stage reports, and which way each is better (the gate and guards are checked
against this catalogue when params load).
"""

from __future__ import annotations

PERTURBATIONS = ("shuffle_choices", "typos", "distractor")  # evaluate.robustness kinds: pipeline/data/perturb.py

# What the evaluate stage measures for each model (`<model>_<metric>`, model: base, dapt, tuned, champion),
# by eval format, and which way is better (True: higher). pipeline/stages/evaluate.py produces exactly these;
# MCQ items that carry a category also get `accuracy_<category>` (higher is better). The robust_* metrics
# (accuracy on perturbed copies, pooled and per perturbation) exist while evaluate.robustness lists
# perturbations, for base, tuned and champion (not dapt).
EVAL_METRICS: dict[str, dict[str, bool]] = {
    # acc_ci95_low/high: the Wilson 95 % interval of accuracy (a gate on the low end asks for a sure gain)
    "mcq": {"accuracy": True, "acc_ci95_low": True, "acc_ci95_high": True, "generation_em": True, "eos_rate": True,
            # ppl_*: text packed into blocks as DAPT trains; ppl_*_doc: each document from its BOS
            "ppl_domain": False, "ppl_general": False, "ppl_domain_doc": False, "ppl_general_doc": False,
            # robust_acc_ci95_*: resampled by item (an item's copies are not independent trials);
            # robust_clean_accuracy: clean accuracy on the same items, weighted as their copies (robustness_drop's base)
            "robust_accuracy": True, "robust_acc_ci95_low": True, "robust_acc_ci95_high": True,
            "robust_clean_accuracy": True,
            # tuned only, when it is scored in a dtype other than float32 (sft.compute_dtype, `auto` included):
            # items whose chosen option differs from float32 scoring of the same model
            "float32_changed_choices": False,
            **{f"robust_accuracy_{kind}": True for kind in PERTURBATIONS}},
    "chat": {"answer_loss": False, "answer_ppl": False, "generation_em": True, "rougeL": True, "eos_rate": True,
             "ppl_domain": False, "ppl_general": False, "ppl_domain_doc": False, "ppl_general_doc": False},
}


# Two models scored on the same eval items (mcq): `<first>_vs_<second>_<stat>`, e.g. tuned_vs_base_acc_diff.
# acc_diff: first's accuracy minus second's; its paired bootstrap 95 % interval; McNemar's exact p; wins and
# losses: items only the first (only the second) gets right. `register.evidence: paired_bootstrap` gates on these.
PAIRED_COMPARISONS = (("tuned", "base"), ("tuned", "champion"))
PAIRED_STATS = ("acc_diff", "acc_diff_ci95_low", "acc_diff_ci95_high", "mcnemar_p", "wins", "losses")


def paired_key(first: str, second: str, stat: str) -> str:
    return f"{first}_vs_{second}_{stat}"

def eval_kind(eval_format: str) -> str:
    return "mcq" if eval_format == "mcq" else "chat"


def metric_direction(metric: str, eval_format: str) -> bool:
    """True when a higher `tuned_<name>` is better; ValueError naming the valid metrics when it is not one."""
    kind = eval_kind(eval_format)
    name = metric.removeprefix("tuned_")
    if metric.startswith("tuned_"):
        if name in EVAL_METRICS[kind]:
            return EVAL_METRICS[kind][name]
        if kind == "mcq" and name.startswith("accuracy_") and len(name) > len("accuracy_"):
            return True  # per-category accuracy
    valid = [f"tuned_{m}" for m in EVAL_METRICS[kind]] + (["tuned_accuracy_<category>"] if kind == "mcq" else [])
    raise ValueError(f"{metric!r} is not a metric the evaluate stage reports for data.eval.format "
                     f"{eval_format}; valid: {', '.join(valid)}")
