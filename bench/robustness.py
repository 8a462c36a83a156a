"""Robustness benchmark: plain SFT vs NEFTune vs FGM vs PGD on the default tiny model, held-out accuracy
(clean and on the evaluate stage's perturbed copies) with Wilson 95 % intervals, paired tests against plain,
and the time each method costs per training step.

    .venv/bin/python bench/robustness.py            # ~10-15 min on 2 cores; writes bench/results-robustness.json
    .venv/bin/python bench/robustness.py --max-steps 10 --out /tmp/smoke.json   # smoke test: numbers mean nothing

Inputs are built exactly as the stages build them: the project's source and params (the working tree, as
tests/helpers/project.py `make_project_copy` copies it) go into a throwaway git + DVC directory, and `dvc repro dapt`
runs there (sample_data, base, validate, dapt) with PIPELINE_PYTHON set to this interpreter and
MLFLOW_TRACKING_URI pointing at a sqlite file in that directory. Nothing is written into the project's own
data/, models/, mlflow/ or dvc.lock; only the results file (--out) is.

Then the adapter is trained four times on the same data with the same seed, each in a fresh process, with
params.yaml's `sft` section unchanged (evaluation and checkpoints every 50 steps included) except:
- plain: nothing changed;
- neftune: `sft.neftune_noise_alpha` 5 (the value the params comment suggests);
- fgm: `sft.adversarial.method: fgm` with params.yaml's epsilon;
- pgd: `sft.adversarial.method: pgd` with params.yaml's epsilon, steps and alpha.
Training goes through `pipeline.training.sft.train_adapter` with the arguments the stage's main() passes (the
validation split, the checkpoint dir, the run identity); only MLflow logging is left out. A callback times
every optimizer step from its start to its end (forward, backward, optimizer; the held-out evaluations and
checkpoints that follow some steps are not in it): the median after 5 warm-up steps is "seconds per step".

Each adapter is then loaded the way the evaluate stage loads the tuned model (the DAPT model with the
adapter's quantization, `PeftModel.from_pretrained`, the adapter's tokenizer) and scored with the stage's
own `mcq_metrics` and `robustness_metrics` on the 150 held-out eval items and their perturbed copies, so
the numbers are the stage's. Per-item correctness (the same scorer, checked against the stage's pooled
number) gives per-kind Wilson intervals (the stage's `accuracy_ci95`) and the paired comparison with plain:
McNemar's exact test (scipy's binomtest on the discordant items) and a paired bootstrap 95 % interval of
the accuracy difference (scipy.stats.bootstrap, percentile, fixed seed). For the pooled perturbed copies
(up to three per eval item) the bootstrap resamples eval items with all their copies, since copies of one
item are not independent; the pooled Wilson interval and McNemar treat copies as independent (narrower).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sft_bench import BENCH, OFFLINE, ROOT  # noqa: E402  (bench/ is the script's path; sets the offline env)

WARMUP_STEPS = 5  # leading steps left out of seconds per step (allocator growth, lazy init)


def variants(neftune_alpha: float) -> dict[str, dict]:
    """The sft overrides of each trained adapter (everything else is params.yaml's)."""
    return {"plain": {}, "neftune": {"neftune_noise_alpha": neftune_alpha},
            "fgm": {"adversarial": {"method": "fgm"}}, "pgd": {"adversarial": {"method": "pgd"}}}


def passes_per_step(sft) -> int:
    """Forward/backward passes per micro-batch (pipeline/training/adversarial.py)."""
    method = sft.adversarial.method
    return 1 if method is None else 2 if method == "fgm" else sft.adversarial.steps + 1


def merged(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = merged(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def variant_params(project: Path, sft_update: dict):
    """params.yaml of the project copy with `sft_update` merged in, validated as load_params validates it."""
    import yaml

    from pipeline.config import Params

    raw = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    return Params.model_validate(merged(raw, {"sft": sft_update}))


# ------------------------------------------------------------------------------------------------ inputs

def copy_project(dest: Path) -> dict:
    """The project's source and config (working tree) in dest, committed (the tests' project copy); which
    revision it came from."""
    sys.path.insert(0, str(ROOT))
    from tests.helpers.project import PROJECT_DIRS, PROJECT_FILES, git, make_project_copy

    make_project_copy(dest)
    return {"commit": git(ROOT, "rev-parse", "HEAD").stdout.strip(),
            "dirty_paths": sorted(git(ROOT, "diff", "--name-only", "HEAD", "--", *PROJECT_DIRS, *PROJECT_FILES).stdout.split()
                                  + git(ROOT, "ls-files", "--others", "--exclude-standard", "--",
                                        *PROJECT_DIRS, *PROJECT_FILES).stdout.split())}


def stage_env(work: Path) -> dict[str, str]:
    from pipeline.env import interpreter_env

    env = interpreter_env(**OFFLINE, PIPELINE_PYTHON=sys.executable, MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}")
    env.pop("PIPELINE_RUN_KEY", None)
    return env


def build_inputs(project: Path, work: Path) -> float:
    """`dvc repro dapt` in the copy (a no-op when an earlier --workdir run built it); its seconds."""
    start = time.perf_counter()
    with (work / "dvc-repro.log").open("w") as log:
        proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "dapt"], cwd=project, env=stage_env(work),
                              stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = (work / "dvc-repro.log").read_text(errors="replace").splitlines()[-20:]
        raise SystemExit("error: dvc repro dapt failed in the project copy:\n  " + "\n  ".join(tail))
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- training

def step_timer():
    """A TrainerCallback with the seconds of every optimizer step (on_step_begin to on_step_end)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self.started = None

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.started)

    return StepTimer()


def train_worker(spec: dict) -> dict:
    """One adapter, as the sft stage's main() trains it (without MLflow), in this fresh process."""
    import torch

    from pipeline.data.formats import read_examples
    from pipeline.modeling.chat_template import chat_tokenizer, require_fingerprint
    from pipeline.training.sft import run_identity, train_adapter, validation_examples

    project = Path(spec["project"])
    params = variant_params(project, spec["sft_update"])
    sft, model_dir, processed = params.sft, Path(params.dapt.out_dir), Path(params.validation.out_dir)
    limit = params.validation.max_record_bytes
    examples, eval_examples = read_examples(processed, "train", limit), validation_examples(processed, limit)
    tokenizer = chat_tokenizer(model_dir, params.task.chat_template)
    require_fingerprint(processed, tokenizer, "sft")
    identity = run_identity(params, model_dir, [processed / "train.jsonl", processed / "validation.jsonl"])
    timer = step_timer()
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    logs = train_adapter(model_dir, examples, tokenizer, params, Path(sft.out_dir), eval_examples,
                         Path(sft.checkpoint_dir), identity, callbacks=[timer])
    seconds = time.perf_counter() - start
    timed = timer.seconds[WARMUP_STEPS:] or timer.seconds
    increase = [e["loss"] for e in logs["adversarial"]]
    return {"sft": sft.model_dump(), "passes_per_step": passes_per_step(sft), "steps": len(timer.seconds),
            "train_seconds": seconds, "step_seconds_median": statistics.median(timed),
            "step_seconds_mean": statistics.fmean(timed), "step_seconds_sum": sum(timer.seconds),
            "torch_threads": torch.get_num_threads(), "load_average_start": load_start,
            "load_average_end": os.getloadavg()[0], "train_loss": logs["train"], "eval_loss": logs["eval"],
            "eval_answer_token_accuracy": logs["eval_accuracy"], "adversarial_loss_increase": logs["adversarial"],
            "adversarial_loss_increase_mean": statistics.fmean(increase) if increase else None}


def run_worker(kind: str, spec: dict, work: Path, name: str) -> dict:
    spec_file, result_file, log = work / f"{name}-spec.json", work / f"{name}-result.json", work / f"{name}.log"
    spec_file.write_text(json.dumps(spec, indent=2), encoding="utf-8")
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", kind, str(spec_file),
                               str(result_file)], cwd=spec["project"], env=stage_env(work), stdout=f,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not result_file.is_file():
        tail = log.read_text(errors="replace").strip().splitlines()[-20:]
        raise SystemExit(f"error: {name} failed (exit {proc.returncode}); log {log}:\n  " + "\n  ".join(tail))
    return json.loads(result_file.read_text(encoding="utf-8"))


# -------------------------------------------------------------------------------------------- evaluation

def robust_correct(model, tokenizer, examples, params) -> list[dict]:
    """Per perturbed copy: its kind, item id and whether the stage's scorer picks its answer (the same items,
    order and scorer as robustness_metrics)."""
    from pipeline.data.perturb import perturbed_examples
    from pipeline.evaluation.scoring import choose, option_logprobs

    robustness = params.evaluate.robustness
    items = [(kind, e) for kind in robustness.perturbations
             for e in perturbed_examples(examples, kind, params.seed, params.task, robustness.typo_rate)]
    predictions = choose(option_logprobs(model, tokenizer, [e for _, e in items], params.evaluate.batch_size))
    return [{"kind": kind, "id": e.id, "correct": p == e.answer} for (kind, e), p in zip(items, predictions, strict=True)]


def evaluate_worker(spec: dict) -> dict:
    """Every adapter scored by the evaluate stage's functions, loaded the way the stage loads `tuned`."""
    from peft import PeftModel

    from pipeline.config import load_params
    from pipeline.data.formats import read_examples
    from pipeline.evaluation.metrics import mcq_metrics, robustness_metrics
    from pipeline.evaluation.statistics import accuracy_ci95
    from pipeline.modeling.chat_template import require_fingerprint, stop_token_ids
    from pipeline.modeling.loading import load_causal_lm, load_tokenizer
    from pipeline.registry.machine import machine_tags

    params = load_params(Path(spec["project"]) / "params.yaml")
    processed = params.validation.out_dir
    examples = read_examples(processed, "eval", params.validation.max_record_bytes)[: params.evaluate.max_eval_items]
    load = dict(quantization=params.sft.quantization, double_quant=params.sft.double_quant,
                compute_dtype=params.sft.compute_dtype)
    out: dict = {"machine": machine_tags(), "n_items": len(examples), "adapters": {}}
    for name, adapter in spec["adapters"].items():
        start = time.perf_counter()
        tokenizer = load_tokenizer(adapter)
        require_fingerprint(processed, tokenizer, f"evaluate ({adapter})")
        stop_ids = stop_token_ids(params.base.out_dir, tokenizer)
        model = PeftModel.from_pretrained(load_causal_lm(params.dapt.out_dir, **load), adapter).eval()
        metrics, per_item = mcq_metrics("tuned", model, tokenizer, examples, stop_ids, params)
        metrics |= robustness_metrics("tuned", model, tokenizer, examples, params)
        robust = robust_correct(model, tokenizer, examples, params)
        del model
        pooled = sum(r["correct"] for r in robust) / len(robust)
        if abs(pooled - metrics["tuned_robust_accuracy"]) > 1e-12:
            raise SystemExit(f"error: {name}: per-item robust accuracy {pooled} differs from robustness_metrics' "
                             f"{metrics['tuned_robust_accuracy']}")
        for kind in params.evaluate.robustness.perturbations:
            hits = [r["correct"] for r in robust if r["kind"] == kind]
            low, high = accuracy_ci95(sum(hits), len(hits))
            metrics |= {f"tuned_robust_acc_ci95_low_{kind}": low, f"tuned_robust_acc_ci95_high_{kind}": high}
        clean = [p == e.answer for p, e in zip(per_item["tuned_prediction"], examples, strict=True)]
        out["adapters"][name] = {"metrics": metrics, "ids": [e.id for e in examples], "clean_correct": clean,
                                 "robust": robust, "eval_seconds": time.perf_counter() - start}
    out["pipeline_package"] = str(Path(sys.modules["pipeline"].__file__).parent)  # the copy's, checked in main
    out["evaluate"] = params.evaluate.model_dump()
    out["seed"] = params.seed
    return out


def paired(a: list[bool], b: list[bool], groups: list[str], seed: int, resamples: int) -> dict:
    """a - b on the same items: the difference, McNemar's exact p (binomtest on the discordant items) and
    a paired bootstrap 95 % interval that resamples groups (eval items) with all their entries."""
    import numpy as np
    from scipy.stats import binomtest, bootstrap

    only_a = sum(x and not y for x, y in zip(a, b, strict=True))
    only_b = sum(y and not x for x, y in zip(a, b, strict=True))
    names = sorted(set(groups))
    index = {g: i for i, g in enumerate(names)}
    hits_a, hits_b, counts = np.zeros(len(names)), np.zeros(len(names)), np.zeros(len(names))
    for x, y, g in zip(a, b, groups, strict=True):
        hits_a[index[g]] += x
        hits_b[index[g]] += y
        counts[index[g]] += 1
    result = {"difference": (sum(a) - sum(b)) / len(a), "only_this": only_a, "only_plain": only_b,
              "mcnemar_exact_p": binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0}
    if only_a + only_b == 0:  # the same predictions everywhere: every resample gives 0
        return {**result, "bootstrap_ci95": [0.0, 0.0]}
    ci = bootstrap((hits_a, hits_b, counts), lambda x, y, n: (x.sum() - y.sum()) / n.sum(), paired=True,
                   vectorized=False, n_resamples=resamples, method="percentile",
                   rng=np.random.default_rng(seed)).confidence_interval
    return {**result, "bootstrap_ci95": [float(ci.low), float(ci.high)]}


def comparisons(evaluation: dict, seed: int, resamples: int) -> dict:
    """Each adapter against plain: clean accuracy, pooled perturbed accuracy and each kind."""
    plain = evaluation["adapters"]["plain"]
    kinds = sorted({r["kind"] for r in plain["robust"]}, key=[r["kind"] for r in plain["robust"]].index)
    out = {}
    for name, adapter in evaluation["adapters"].items():
        if name == "plain":
            continue
        keys = [(r["kind"], r["id"]) for r in adapter["robust"]]
        if keys != [(r["kind"], r["id"]) for r in plain["robust"]]:
            raise SystemExit(f"error: {name} was scored on other perturbed items than plain")
        row = {"clean": paired(adapter["clean_correct"], plain["clean_correct"], adapter["ids"], seed, resamples),
               "robust": paired([r["correct"] for r in adapter["robust"]], [r["correct"] for r in plain["robust"]],
                                [r["id"] for r in adapter["robust"]], seed, resamples)}
        for kind in kinds:
            pick = [i for i, r in enumerate(adapter["robust"]) if r["kind"] == kind]
            row[kind] = paired([adapter["robust"][i]["correct"] for i in pick], [plain["robust"][i]["correct"] for i in pick],
                               [adapter["robust"][i]["id"] for i in pick], seed, resamples)
        out[name] = row
    return out


# ------------------------------------------------------------------------------------------------ report

LABELS = {"plain": "plain LoRA (defaults)", "neftune": "NEFTune", "fgm": "FGM", "pgd": "PGD"}


def describe(name: str, sft: dict) -> str:
    adversarial = sft["adversarial"]
    if name == "neftune":
        return f"NEFTune α {sft['neftune_noise_alpha']:g}"
    if name == "fgm":
        return f"FGM ε {adversarial['epsilon']:g}"
    if name == "pgd":
        return f"PGD ε {adversarial['epsilon']:g}, {adversarial['steps']} steps of α {adversarial['alpha']:g}"
    return LABELS[name]


def acc(metrics: dict, key: str, low: str, high: str) -> str:
    return f"{metrics[key]:.3f} [{metrics[low]:.3f}, {metrics[high]:.3f}]"


def diff(c: dict) -> str:
    low, high = c["bootstrap_ci95"]
    return f"{c['difference']:+.3f} [{low:+.3f}, {high:+.3f}], p {c['mcnemar_exact_p']:.2g}"


def tables(result: dict) -> str:
    runs, adapters, comp = result["training"], result["evaluation"]["adapters"], result["comparisons"]
    kinds = result["evaluation"]["evaluate"]["robustness"]["perturbations"]
    n = result["evaluation"]["n_items"]
    counts = adapters["plain"]["metrics"]
    robust_n = sum(counts[f"robust_n_items_{k}"] for k in kinds)
    plain_step = runs["plain"]["step_seconds_median"]
    per_kind = ", ".join(f"{k} {counts['robust_n_items_' + k]}" for k in kinds)
    lines = [f"Accuracy (Wilson 95 % interval) on the {n} held-out eval items and on their {robust_n} perturbed copies "
             f"({per_kind})", "",
             "| adapter | clean | perturbed, pooled | " + " | ".join(kinds) + " |",
             "|---|---|---|" + "---|" * len(kinds)]
    for name, adapter in adapters.items():
        m = adapter["metrics"]
        cells = [acc(m, "tuned_accuracy", "tuned_acc_ci95_low", "tuned_acc_ci95_high"),
                 acc(m, "tuned_robust_accuracy", "tuned_robust_acc_ci95_low", "tuned_robust_acc_ci95_high")]
        cells += [acc(m, f"tuned_robust_accuracy_{k}", f"tuned_robust_acc_ci95_low_{k}", f"tuned_robust_acc_ci95_high_{k}")
                  for k in kinds]
        lines.append(f"| {describe(name, runs[name]['sft'])} | " + " | ".join(cells) + " |")
    lines += ["", "Difference from plain on the same items (paired bootstrap 95 % interval; McNemar exact p)", "",
              "| adapter | clean | perturbed, pooled | " + " | ".join(kinds) + " |",
              "|---|---|---|" + "---|" * len(kinds)]
    for name, row in comp.items():
        lines.append(f"| {describe(name, runs[name]['sft'])} | " + " | ".join(diff(row[k]) for k in ["clean", "robust", *kinds]) + " |")
    lines += ["", f"Training cost ({runs['plain']['steps']} steps, batch {runs['plain']['sft']['batch_size']}, "
              f"{runs['plain']['torch_threads']} torch thread(s); s/step: median step after {WARMUP_STEPS} warm-up steps)", "",
              "| adapter | passes per step | s/step | × plain | train s (evals, checkpoints, save incl.) | "
              "adversarial / clean loss (mean of logged) |", "|---|---|---|---|---|---|"]
    for name, run in runs.items():
        increase = run["adversarial_loss_increase_mean"]
        lines.append(f"| {describe(name, run['sft'])} | {run['passes_per_step']} | {run['step_seconds_median']:.3f} | "
                     f"{run['step_seconds_median'] / plain_step:.2f} | {run['train_seconds']:.0f} | "
                     f"{'—' if increase is None else f'{increase:.4f}'} |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=BENCH / "results-robustness.json", help="results file")
    ap.add_argument("--max-steps", type=int, help="SFT steps per adapter (default: params.yaml's sft.max_steps)")
    ap.add_argument("--neftune-alpha", type=float, default=5.0, help="NEFTune's noise alpha (default 5)")
    ap.add_argument("--resamples", type=int, default=10000, help="paired bootstrap resamples (default 10000)")
    ap.add_argument("--workdir", type=Path, help="build and keep everything here instead of a temp dir "
                                                 "(a second run reuses its inputs: dvc repro is then a no-op)")
    ap.add_argument("--worker", nargs=3, metavar=("KIND", "SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, spec_file, result_file = args.worker
        spec = json.loads(Path(spec_file).read_text(encoding="utf-8"))
        sys.path.insert(0, spec["project"])  # the copy's pipeline package, not the checkout's
        result = {"train": train_worker, "evaluate": evaluate_worker}[kind](spec)
        Path(result_file).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        return
    out = args.out.resolve()
    started = time.perf_counter()
    work = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="robustness-bench-"))
    project = work / "project"
    print(f"robustness bench: work dir {work}", flush=True)
    try:
        work.mkdir(parents=True, exist_ok=True)
        source = copy_project(project) if not project.exists() else {"reused": str(project)}
        build_s = build_inputs(project, work)
        print(f"  inputs: dvc repro dapt in the copy, {build_s:.0f} s", flush=True)
        training, adapters = {}, {}
        for name, update in variants(args.neftune_alpha).items():
            update = {**update, "out_dir": f"adapters/{name}", "checkpoint_dir": f"checkpoints/{name}",
                      **({"max_steps": args.max_steps} if args.max_steps else {})}
            run = run_worker("train", {"project": str(project), "sft_update": update}, work, f"train-{name}")
            training[name], adapters[name] = run, str(project / "adapters" / name)
            increase = run["adversarial_loss_increase_mean"]
            print(f"  {name}: {run['steps']} steps in {run['train_seconds']:.0f} s, {run['step_seconds_median']:.3f} s/step"
                  + ("" if increase is None else f", adversarial/clean loss {increase:.4f}")
                  + f" (load average {run['load_average_start']:.2f} -> {run['load_average_end']:.2f})", flush=True)
        evaluation = run_worker("evaluate", {"project": str(project), "adapters": adapters}, work, "evaluate")
        if Path(evaluation["pipeline_package"]) != project / "pipeline":
            raise SystemExit(f"error: the workers imported {evaluation['pipeline_package']}, not the copy's pipeline")
        print(f"  evaluated {len(adapters)} adapters in {sum(a['eval_seconds'] for a in evaluation['adapters'].values()):.0f} s",
              flush=True)
        result = {"command": "bench/robustness.py " + " ".join(sys.argv[1:]), "source": source,
                  "variants": variants(args.neftune_alpha), "max_steps_override": args.max_steps,
                  "inputs_seconds": build_s, "training": training, "evaluation": evaluation,
                  "comparisons": comparisons(evaluation, evaluation["seed"], args.resamples),
                  "bootstrap": {"resamples": args.resamples, "seed": evaluation["seed"], "method": "percentile"},
                  "environment": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "cpus": os.cpu_count(),
                                  "load_average_end": os.getloadavg()},
                  "wall_seconds": time.perf_counter() - started}
        result["table_markdown"] = tables(result)
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print()
        print(result["table_markdown"])
        print(f"\nmachine_class {evaluation['machine']['machine_class']}; total {result['wall_seconds']:.0f} s; "
              f"results written to {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
