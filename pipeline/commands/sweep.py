"""A params grid as DVC experiments, tracked in MLflow, with the best one promoted through the gate.

    .venv/bin/python -m pipeline.commands.sweep -S 'sft.adversarial.method=fgm,pgd' -S 'sft.learning_rate=0.001,0.002'

1. Every combination of the `-S` values (DVC's Hydra sweep syntax: `key=a,b`, `key=range(1,4)`) is
   checked against the params schema before anything is queued: a bad key or value stops here.
2. `dvc exp run --queue <target> -S ...` queues the grid (target `evaluate`: experiments train and
   evaluate, none registers) and `dvc queue start -j <jobs>` runs it in DVC's own workers, each
   experiment in its own temporary workspace; stages the grid does not touch come from the DVC cache.
3. One MLflow run `sweep-<id>` is the parent of every experiment's run (named after the experiment; its
   stages' runs nest under it), and each experiment's run gets the swept params and the eval metrics.
4. `dvc exp show --md` of the sweep is printed and logged with a bar chart (gate metric with its 95 %
   interval, robust accuracy beside it when measured) to the sweep run.
5. The best experiment is chosen on the validation split, never on eval (the gate then judges it on eval:
   selecting on the same items would bias that judgement): the highest held-out answer-token accuracy of the
   adapter the sft stage wrote (metrics/sft.json), ties to the lower held-out loss, then to the first queued.
   It is applied with `dvc exp apply` and registered with `dvc repro register` under the checkout's pipeline
   lock: the gate decides whether it becomes champion; params.yaml then holds its params (commit them to keep
   them). `--no-promote` stops after the comparison.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from pipeline.artifacts import EVAL_METRICS, SFT_METRICS
from pipeline.cli import cli_parser, run_cli
from pipeline.config import Params, load_params
from pipeline.env import interpreter_env
from pipeline.errors import DataError
from pipeline.tracking import RUN_KEY_TAG, SWEEP_RUN_ENV, configure, tracking_uri

FINISHED = ("Success", "Failed")
# The eval metrics `dvc exp show` lists beside the swept params.
SHOWN_METRICS = ("tuned_accuracy", "tuned_acc_ci95_low", "tuned_acc_ci95_high", "tuned_robust_accuracy",
                 "base_accuracy", "tuned_eos_rate")


def grid(sets: list[str], params_file: Path = Path("params.yaml")) -> list[list[str]]:
    """Every combination of the overrides (as `dvc exp run --queue` expands them), each checked against the
    params schema."""
    from dvc.utils.hydra import apply_overrides, get_hydra_sweeps

    try:
        combos = [c[str(params_file)] for c in get_hydra_sweeps({str(params_file): sets})]
    except Exception as exc:  # Hydra's parser errors carry the offending override
        raise DataError(f"sweep overrides {sets}: {exc}") from None
    with tempfile.TemporaryDirectory() as tmp:
        for combo in combos:
            path = Path(tmp) / "params.yaml"
            path.write_text(params_file.read_text(encoding="utf-8"), encoding="utf-8")
            try:
                apply_overrides(str(path), combo)
            except Exception as exc:
                raise DataError(f"sweep overrides {combo}: {exc}") from None
            try:
                load_params(path)
            except SystemExit:  # load_params printed which key is wrong
                raise DataError(f"sweep overrides {combo}: the params above are invalid; fix the -S values") from None
    return combos


def sweep_env(params: Params, run_id: str, key: str) -> dict[str, str]:
    """What the queue workers (and through them every stage) need: this interpreter, an absolute tracking URI
    (experiments run in temporary copies of the project), the sweep's run and key."""
    uri = tracking_uri(params)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return interpreter_env(PIPELINE_PYTHON=os.environ.get("PIPELINE_PYTHON", sys.executable),
                           MLFLOW_TRACKING_URI=uri, PIPELINE_RUN_KEY=key, **{SWEEP_RUN_ENV: run_id})


def dvc(*args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], env=env, capture_output=True, text=True)
    if check and proc.returncode:
        raise DataError(f"dvc {' '.join(args)} failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-2000:]}")
    return proc


def queue(sets: list[str], target: str, env: dict) -> dict[str, list[str]]:
    """Queue the grid; the name DVC gave each experiment, with its overrides."""
    out = dvc("exp", "run", "--queue", target, *(a for s in sets for a in ("-S", s)), env=env).stdout
    pairs = re.findall(r"Queueing with overrides '(.*)'\.\s*Queued experiment '([^']+)'", out)
    if not pairs:
        raise DataError(f"dvc exp run --queue queued nothing:\n{out[-2000:]}")
    return {name: next(iter(ast.literal_eval(overrides).values())) for overrides, name in pairs}


def experiments(names: list[str]) -> dict[str, dict]:
    """This sweep's rows of `dvc exp show` (dvc.api.exp_show), by experiment name."""
    import dvc.api

    return {row["Experiment"]: row for row in dvc.api.exp_show(force=True) if row.get("Experiment") in names}


def wait(names: list[str], timeout: float, poll: float = 5.0) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        rows = experiments(names)
        states = {n: rows.get(n, {}).get("State") for n in names}
        if all(s in FINISHED for s in states.values()):
            return rows
        if time.monotonic() > deadline:
            raise DataError(f"sweep: not finished after {timeout:.0f} s: {states}; see `dvc queue status`")
        time.sleep(poll)


def apply_experiment(name: str, rev: str, env: dict) -> None:
    """`dvc exp apply`: the experiment's params, dvc.lock and outputs into the workspace.

    The checkout fails for outputs the cache does not hold: register's when the baseline never registered
    (experiments stop before it), or those of another pipeline in the repo that was never run here (the
    real-data imports of data/real/dvc.yaml). What the experiment itself decided is its params.yaml and
    dvc.lock: when both are in place, `dvc repro register` goes on (and stops, naming it, if register needs
    something missing). Anything else that did not apply is an error."""
    proc = dvc("exp", "apply", name, env=env, check=False)
    if proc.returncode == 0:
        return
    same = all(Path(f).is_file() and Path(f).read_text(encoding="utf-8") == subprocess.run(
        ["git", "show", f"{rev}:{f}"], capture_output=True, text=True).stdout for f in ("params.yaml", "dvc.lock"))
    if not same:
        raise DataError(f"dvc exp apply {name} failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-2000:]}")
    listed = (proc.stderr + proc.stdout).split("following targets:")[-1].split("Is your cache")[0]
    failed = [line.strip() for line in listed.splitlines() if line.strip()]
    print(f"sweep: applied {name}; not checked out (not in the cache): {', '.join(failed) or 'see dvc exp apply'}")


def committed_metrics(rev: str, path: Path) -> dict:
    """A metrics file as the experiment committed it (metrics/*.json are git-tracked)."""
    shown = subprocess.run(["git", "show", f"{rev}:{path.as_posix()}"], capture_output=True, text=True)
    return json.loads(shown.stdout) if shown.returncode == 0 else {}


def experiment_metrics(rev: str) -> dict:
    """The experiment's eval metrics and its adapter's validation-split scores (`sft_validation_*`)."""
    return {**committed_metrics(rev, EVAL_METRICS),
            **{f"sft_{k}": v for k, v in committed_metrics(rev, SFT_METRICS).items()}}


def interval(metric: str) -> tuple[str, str] | None:
    """The names of a metric's 95 % interval bounds (tuned_accuracy -> tuned_acc_ci95_low/high)."""
    if not metric.endswith("accuracy"):
        return None
    stem = metric.removesuffix("accuracy") + "acc_ci95"
    return f"{stem}_low", f"{stem}_high"


SELECT_ON = ("sft_validation_answer_accuracy", "sft_validation_loss")  # higher accuracy, then lower loss


def best_experiment(results: dict[str, dict]) -> str | None:
    """The experiment whose adapter scores best on the validation split (ties: the first queued); None when
    no experiment measured it (sft.eval_steps null)."""
    scored = [(name, m[SELECT_ON[0]], m[SELECT_ON[1]]) for name, m in results.items() if all(k in m for k in SELECT_ON)]
    if not scored:
        return None
    return max(scored, key=lambda item: (item[1], -item[2]))[0]


def sweep_figure(results: dict[str, dict], metric: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    series = [m for m in (metric, "tuned_robust_accuracy") if any(m in r for r in results.values())]
    series = list(dict.fromkeys(series))
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(names) + 2), 3.5))
    width = 0.8 / len(series)
    for i, name in enumerate(series):
        values = [results[n].get(name, float("nan")) for n in names]
        bounds = interval(name)
        errors = None
        if bounds and all(b in results[n] for n in names for b in bounds):
            errors = [[v - results[n][bounds[0]] for v, n in zip(values, names)],
                      [results[n][bounds[1]] - v for v, n in zip(values, names)]]
        ax.bar([x + i * width for x in range(len(names))], values, width, yerr=errors, capsize=3, label=name)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(names))], names, rotation=20, ha="right")
    ax.set(ylabel="held-out score", title="sweep: experiments (95 % intervals)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def promote_best(best: str, rev: str, env: dict, run_key: str) -> dict:
    """Apply the best experiment and `dvc repro register` it under the checkout's pipeline lock (flows/lock.py), so a
    scheduled or manual run of the checkout never interleaves with it; returns reports/registry.json."""
    from flows.lock import pipeline_lock

    with pipeline_lock(Path.cwd(), f"sweep: apply and register {best}"):
        apply_experiment(best, rev, env)
        register_env = {k: v for k, v in env.items() if k != SWEEP_RUN_ENV} | {"PIPELINE_RUN_KEY": run_key}
        print(dvc("repro", "register", env=register_env).stdout[-1500:])
        return json.loads(Path("reports/registry.json").read_text(encoding="utf-8"))


def run_sweep(sets: list[str], jobs: int = 1, target: str = "evaluate", promote: bool = True,
              timeout: float = 6 * 3600) -> dict:
    import mlflow
    from mlflow import MlflowClient

    params = load_params()
    combos = grid(sets)
    sweep_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    experiment_id = configure(params)
    client = MlflowClient()
    parent = client.create_run(experiment_id, run_name=f"sweep-{sweep_id}",
                               tags={"stage": "sweep", "sweep_id": sweep_id, "sweep.overrides": json.dumps(sets)})
    parent_id = parent.info.run_id
    key = f"sweep-{sweep_id}"
    env = sweep_env(params, parent_id, key)
    status = "FAILED"
    try:
        queued = queue(sets, target, env)
        names = list(queued)
        print(f"sweep: queued {len(names)} experiments ({len(combos)} combinations): {', '.join(names)}")
        dvc("queue", "start", "-j", str(jobs), env=env)
        rows = wait(names, timeout)
        failed = [n for n in names if rows[n]["State"] != "Success"]
        for name in failed:
            logs = dvc("queue", "logs", name, env=env, check=False)
            print(f"sweep: experiment {name} failed:\n{(logs.stdout or logs.stderr)[-3000:]}", file=sys.stderr)
        results = {n: experiment_metrics(rows[n]["rev"]) for n in names if n not in failed}
        gate = params.registry.gate_metric
        for name, combo in queued.items():
            found = client.search_runs([experiment_id], f"tags.{RUN_KEY_TAG} = '{key}-{name}'", max_results=1)
            if not found:
                continue
            run_id = found[0].info.run_id
            for override in combo:
                k, _, v = override.partition("=")
                client.log_param(run_id, k, v)
            numbers = {k: float(v) for k, v in results.get(name, {}).items() if isinstance(v, (int, float))}
            if numbers:
                client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, v, int(time.time() * 1000), 0)
                                                  for k, v in numbers.items()])
            client.set_tag(run_id, "dvc_exp", name)
            client.set_tag(run_id, "dvc_exp_rev", rows[name]["rev"])
            client.set_terminated(run_id, "FINISHED" if name not in failed else "FAILED")
        columns = sorted({o.partition("=")[0] for combo in queued.values() for o in combo}) + list(SHOWN_METRICS)
        table = dvc("exp", "show", "--md", "--no-pager", "--drop", ".*",
                    "--keep", "^(Experiment|" + "|".join(re.escape(c) for c in columns) + ")$", env=env).stdout
        print(table)
        client.log_text(parent_id, table, "sweep/dvc_exp_show.md")
        if results:
            import matplotlib.pyplot as plt

            fig = sweep_figure(results, gate)
            client.log_figure(parent_id, fig, "sweep/comparison.png")
            plt.close(fig)
        best = best_experiment(results)
        summary = {"sweep_id": sweep_id, "run_id": parent_id, "experiments": names, "failed": failed,
                   "selected_on": list(SELECT_ON), "gate_metric": gate,
                   "validation": {n: {k: r.get(k) for k in SELECT_ON} for n, r in results.items()},
                   "scores": {n: r.get(gate) for n, r in results.items()}, "best": best, "overrides": queued}
        if best is None:
            raise DataError(f"sweep: no experiment has validation scores to select on (failed: "
                            f"{', '.join(failed) or 'none'}); set sft.eval_steps so the sft stage measures them")
        client.set_tag(parent_id, "best_experiment", best)
        print(f"sweep: best on the validation split: {best} (answer-token accuracy "
              f"{results[best][SELECT_ON[0]]:.4f}, loss {results[best][SELECT_ON[1]]:.4f}); its {gate} on eval "
              f"{results[best].get(gate, float('nan')):.4f} goes to the gate")
        if promote:
            registry = promote_best(best, rows[best]["rev"], env, f"{key}-{best}")
            summary["registered"] = registry
            client.set_tag(parent_id, "promotion", f"{registry['model_uri']} -> @{registry['alias']}: {registry['reason']}")
        Path("reports").mkdir(exist_ok=True)
        Path("reports/sweep.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        client.log_dict(parent_id, summary, "sweep/summary.json")
        status = "FINISHED" if not failed else "FAILED"
        return summary
    finally:
        client.set_terminated(parent_id, status)


def main(argv: list[str] | None = None) -> None:
    parser = cli_parser(__doc__, "python -m pipeline.commands.sweep")
    parser.add_argument("-S", "--set-param", dest="sets", action="append", required=True,
                        help="a params override with sweep values, e.g. sft.learning_rate=0.001,0.002 (repeatable)")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="DVC queue workers (experiments at a time)")
    parser.add_argument("--target", default="evaluate", help="the stage experiments run up to (default: evaluate)")
    parser.add_argument("--no-promote", action="store_true", help="compare only: do not apply and register the best")
    args = parser.parse_args(argv)
    summary = run_sweep(args.sets, jobs=args.jobs, target=args.target, promote=not args.no_promote)
    if summary["failed"]:
        raise SystemExit(f"sweep: {len(summary['failed'])} experiments failed: {', '.join(summary['failed'])}")


if __name__ == "__main__":
    run_cli(main)
