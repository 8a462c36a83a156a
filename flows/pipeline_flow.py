"""Prefect 3 flow that chains the DVC stages: one task per stage, same names as in dvc.yaml.

Each task only runs `dvc repro --single-item <stage>` in the project directory, so dvc.lock stays
the record of what was built and DVC skips a stage whose deps and params did not change. Hence no
Prefect result caching here. PIPELINE_RUN_KEY is set to the flow run id, so all stages of one flow
run log into one MLflow parent run (see pipeline/tracking.py).

For a team (prefect.yaml, `make team-up`): `overrides` are params changes in `dvc exp run -S` grammar
(`sft.max_steps=100`), applied to the checkout's params.yaml for this run only (restored when it ends, however
it ends, so the next user's run on the same checkout never inherits them); `only_if_changed`
asks `dvc status` first and ends as "up to date" when no dep, param or data changed; and under
PIPELINE_TRAINING_LIMIT (the workers' environment) the model stages hold one slot of that Prefect global
concurrency limit, so one training runs at a time across all workers and machines. Every run publishes a
markdown artifact: the eval metrics, the promotion decision and links to the MLflow run and version.

Run once from the project root:  python -c "from flows.pipeline_flow import finetune_pipeline; finetune_pipeline()"
Scheduled deployment:             python -m flows.deploy  (one process)  |  prefect.yaml (a work pool)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.lock import pipeline_lock

# Same names and order as the stages in dvc.yaml (tests/integration/test_flows.py checks that they agree).
STAGES: tuple[str, ...] = ("sample_data", "base", "validate", "dapt", "sft", "evaluate", "register")

# Only `register` can fail transiently (it talks to the MLflow tracking server). Data validation and
# training failures are deterministic: retrying them only wastes time.
RETRIES: dict[str, int] = {"register": 2}
RETRY_DELAY_SECONDS = 10

# Stages that load a model (the GPU's work): under PIPELINE_TRAINING_LIMIT they hold one slot of that Prefect
# global concurrency limit, from the first of them to the last, so two runs never train at once.
TRAINING_STAGES: tuple[str, ...] = ("dapt", "sft", "evaluate")
TRAINING_LIMIT_ENV = "PIPELINE_TRAINING_LIMIT"
REPORT_KEY = "finetune-report"

TAIL_LINES = 40
TAIL_CHARS = 4000


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message carries the tail of its stderr."""


def _tail(text: str, lines: int = TAIL_LINES, chars: int = TAIL_CHARS) -> str:
    tail = "\n".join(text.rstrip().splitlines()[-lines:])
    return tail[-chars:]


def stage_env(run_key: str | None) -> dict[str, str]:
    """The stage's environment: this interpreter for bin/stage (so each stage runs in the flow's venv)
    and the flow run id as PIPELINE_RUN_KEY."""
    env = dict(os.environ)
    env["PIPELINE_PYTHON"] = sys.executable
    if run_key:
        env["PIPELINE_RUN_KEY"] = run_key
    return env


def run_stage(stage: str, project_dir: str, run_key: str | None) -> bool:
    """Run one DVC stage; return whether it ran (False: DVC found it unchanged and skipped it), or raise
    StageFailed with its stderr tail."""
    logger = get_run_logger()
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    logger.info("Running %r in %s (PIPELINE_RUN_KEY=%s)", " ".join(cmd[2:]), project_dir, run_key)
    proc = subprocess.run(cmd, cwd=project_dir, env=stage_env(run_key), capture_output=True, text=True)
    out_tail = _tail(proc.stdout)
    if out_tail:
        logger.info("Stage %s stdout (tail):\n%s", stage, out_tail)
    if proc.returncode != 0:
        err_tail = _tail(proc.stderr) or "(no stderr)"
        raise StageFailed(f"stage {stage!r} failed with exit code {proc.returncode}; stderr tail:\n{err_tail}")
    err_tail = _tail(proc.stderr)
    if err_tail:
        logger.debug("Stage %s stderr (tail):\n%s", stage, err_tail)
    return f"Running stage '{stage}'" in proc.stdout


def _stage_task(stage: str):
    def stage_fn(project_dir: str, run_key: str | None) -> bool:
        return run_stage(stage, project_dir, run_key)

    # A distinct name per stage gives each task its own task key and a readable name in the UI.
    stage_fn.__name__ = stage_fn.__qualname__ = stage
    stage_fn.__doc__ = f"`dvc repro --single-item {stage}` in the project directory."
    return task(
        stage_fn,
        name=stage,
        task_run_name=stage,
        retries=RETRIES.get(stage, 0),
        retry_delay_seconds=RETRY_DELAY_SECONDS if stage in RETRIES else 0,
        cache_policy=NO_CACHE,
        persist_result=False,
    )


STAGE_TASKS: dict[str, Callable[..., bool]] = {stage: _stage_task(stage) for stage in STAGES}


def dvc_status(project: str, stages: list[str]) -> dict:
    """`dvc status --json` of the stages this run would execute (dvc.yaml's, by name): {} when each one's deps,
    params and outs are as dvc.lock records them (nothing to train); else which changed and how. Other
    pipelines of the repository (data/real/dvc.yaml's imports, absent from a fresh clone) are not this run's
    business. Hashes files; loads no model."""
    targets = [f"dvc.yaml:{stage}" for stage in stages]
    proc = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", *targets], cwd=project,
                          env=stage_env(None), capture_output=True, text=True)
    if proc.returncode != 0:
        raise StageFailed(f"dvc status failed with exit code {proc.returncode}:\n{_tail(proc.stderr)}")
    return json.loads(proc.stdout or "{}")


def apply_overrides(project: str, overrides: list[str]) -> None:
    """Change params.yaml the way `dvc exp run -S` does (DVC's own Hydra override parser), then check the result
    against the params schema; a bad override leaves params.yaml as it was and fails the run, naming it."""
    from dvc.utils.hydra import apply_overrides as dvc_apply

    from pipeline.config import load_params

    path = Path(project) / "params.yaml"
    before = path.read_text(encoding="utf-8")
    try:
        dvc_apply(str(path), list(overrides))
        load_params(path)
    except BaseException as exc:
        path.write_text(before, encoding="utf-8")
        raise ValueError(f"params overrides {list(overrides)} rejected: {exc}") from None


def report_markdown(project: str, ran: list[str], note: str) -> str:
    """The run's summary: stages run, eval metrics per model, the promotion decision, links into MLflow."""
    root = Path(project)
    lines = [f"# Fine-tuning run\n\n{note}\n", f"Stages run: {', '.join(ran) if ran else 'none'}\n"]
    metrics_file, registry_file = root / "metrics/eval.json", root / "reports/registry.json"
    if "evaluate" in ran and metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        columns = ["accuracy", "acc_ci95_low", "acc_ci95_high", "generation_em", "eos_rate", "ppl_domain",
                   "ppl_general"]
        models = [m for m in ("base", "dapt", "tuned", "champion") if f"{m}_accuracy" in metrics or f"{m}_loss" in metrics]
        lines.append("| model | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
        for model in models:
            cells = [metrics.get(f"{model}_{c}") for c in columns]
            lines.append(f"| {model} | " + " | ".join("" if v is None else f"{v:.4f}" for v in cells) + " |")
        lines.append(f"\nItems: {metrics.get('n_items', '?')}\n")
    if "register" in ran and registry_file.is_file():
        reg = json.loads(registry_file.read_text(encoding="utf-8"))
        lines.append(f"Promotion: version {reg['version']} of `{reg['model_name']}` -> **@{reg['alias']}** "
                     f"({reg['reason']})\n")
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        if uri.startswith(("http://", "https://")):
            from pipeline.tracking import redact

            base = redact(uri).rstrip("/")
            experiment = run_experiment(reg["run_id"])
            lines.append(f"- [MLflow run]({base}/#/experiments/{experiment}/runs/{reg['run_id']})\n"
                         f"- [Model version]({base}/#/models/{reg['model_name']}/versions/{reg['version']})")
        else:
            lines.append(f"- MLflow run `{reg['run_id']}`, `{reg['model_uri']}` (`make ui` opens the store)")
    return "\n".join(lines) + "\n"


def run_experiment(run_id: str) -> str:
    from mlflow import MlflowClient

    return MlflowClient().get_run(run_id).info.experiment_id


def publish_report(project: str, ran: list[str], note: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown=report_markdown(project, ran, note), key=REPORT_KEY,
                             description="eval metrics, promotion decision, MLflow links")


@flow(name="finetune-pipeline", persist_result=False)
def finetune_pipeline(project_dir: str = ".", stages: list[str] | None = None,
                      lock_timeout_s: float | None = None, overrides: list[str] | None = None,
                      only_if_changed: bool = False) -> list[str]:
    """Run the DVC stages in dvc.yaml order (all of them, or only `stages`), stopping at the first failure.

    The whole run holds the checkout's pipeline lock (flows/lock.py): another execution waits for it,
    up to `lock_timeout_s` (default PIPELINE_LOCK_TIMEOUT, 6 h), then this run fails saying who holds it.
    `overrides` (`key=value`, as `dvc exp run -S`) change params.yaml first; `only_if_changed` ends the run as
    "up to date" when `dvc status` finds nothing changed. Returns the stages that ran (DVC skips unchanged ones)."""
    logger = get_run_logger()
    selected = list(STAGES) if stages is None else list(stages)
    unknown = sorted(set(selected) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; known stages: {list(STAGES)}")
    ordered = [s for s in STAGES if s in selected]
    project = str(Path(project_dir).resolve())
    run_key = flow_run.id  # prefect.runtime: the id of this flow run
    limit = os.environ.get(TRAINING_LIMIT_ENV)
    logger.info("Stages %s in %s, PIPELINE_RUN_KEY=%s", ordered, project, run_key)
    with pipeline_lock(project, f"Prefect flow run {run_key}", lock_timeout_s, log=logger.warning):
        logger.info("Holding the pipeline lock of %s", project)
        params_file = Path(project) / "params.yaml"
        committed = params_file.read_text(encoding="utf-8")
        if overrides:
            apply_overrides(project, overrides)
            logger.info("params.yaml changed by %s for this run", list(overrides))
        try:
            return run_stages(project, ordered, run_key, limit, only_if_changed, logger)
        finally:
            if params_file.read_text(encoding="utf-8") != committed:
                params_file.write_text(committed, encoding="utf-8")
                logger.info("params.yaml restored: the overrides applied to this run only")


def run_stages(project: str, ordered: list[str], run_key: str, limit: str | None, only_if_changed: bool,
               logger) -> list[str]:
    """The stages in order under the held pipeline lock (see finetune_pipeline)."""
    if only_if_changed:
        changed = dvc_status(project, ordered)
        if not changed:
            logger.info("Up to date, nothing to train: no data, param or code dep changed since dvc.lock")
            publish_report(project, [], "Up to date, nothing to train (`dvc status`: no change).")
            return []
        logger.info("Changed since dvc.lock: %s", sorted(changed))
    ran: list[str] = []
    with ExitStack() as slot:
        held = False
        for stage in ordered:
            if limit and stage in TRAINING_STAGES and not held:
                from prefect.concurrency.sync import concurrency

                logger.info("Waiting for a slot of the global concurrency limit %r", limit)
                slot.enter_context(concurrency(limit, occupy=1, strict=True))
                held = True
                logger.info("Holding a %r slot", limit)
            elif held and stage not in TRAINING_STAGES:
                slot.close()  # the model stages are over: another run may train now
                held = False
                logger.info("Released the %r slot", limit)
            # Called directly: a failed stage raises here, so the flow fails and later stages never start.
            if STAGE_TASKS[stage](project, run_key):
                ran.append(stage)
    skipped = [s for s in ordered if s not in ran]
    publish_report(project, ran, f"Flow run `{run_key}` in `{project}`; unchanged, so skipped by DVC: "
                                 f"{', '.join(skipped) or 'none'}.")
    return ran
