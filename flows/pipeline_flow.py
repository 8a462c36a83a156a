"""Prefect 3 flow that chains the DVC stages: one task per stage, same names as in dvc.yaml.

Each task only runs `dvc repro --single-item <stage>` in the project directory, so dvc.lock stays
the record of what was built and DVC skips a stage whose deps and params did not change. Hence no
Prefect result caching here. PIPELINE_RUN_KEY is set to the flow run id, so all stages of one flow
run log into one MLflow parent run (see pipeline/tracking.py).

Run once from the project root:  python -c "from flows.pipeline_flow import finetune_pipeline; finetune_pipeline()"
Scheduled deployment:             python -m flows.deploy
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.lock import pipeline_lock

# Same names and order as the stages in dvc.yaml (tests/test_flows.py checks that they agree).
STAGES: tuple[str, ...] = ("sample_data", "base", "validate", "dapt", "sft", "evaluate", "register")

# Only `register` can fail transiently (it talks to the MLflow tracking server). Data validation and
# training failures are deterministic: retrying them only wastes time.
RETRIES: dict[str, int] = {"register": 2}
RETRY_DELAY_SECONDS = 10

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


def run_stage(stage: str, project_dir: str, run_key: str | None) -> str:
    """Run one DVC stage; return its stdout tail or raise StageFailed with its stderr tail."""
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
    return out_tail


def _stage_task(stage: str):
    def stage_fn(project_dir: str, run_key: str | None) -> str:
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


STAGE_TASKS: dict[str, Callable[..., str]] = {stage: _stage_task(stage) for stage in STAGES}


@flow(name="finetune-pipeline", persist_result=False)
def finetune_pipeline(project_dir: str = ".", stages: list[str] | None = None,
                      lock_timeout_s: float | None = None) -> list[str]:
    """Run the DVC stages in dvc.yaml order (all of them, or only `stages`), stopping at the first failure.

    The whole run holds the checkout's pipeline lock (flows/lock.py): another execution waits for it,
    up to `lock_timeout_s` (default PIPELINE_LOCK_TIMEOUT, 6 h), then this run fails saying who holds it."""
    logger = get_run_logger()
    selected = list(STAGES) if stages is None else list(stages)
    unknown = sorted(set(selected) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; known stages: {list(STAGES)}")
    ordered = [s for s in STAGES if s in selected]
    project = str(Path(project_dir).resolve())
    run_key = flow_run.id  # prefect.runtime: the id of this flow run
    logger.info("Stages %s in %s, PIPELINE_RUN_KEY=%s", ordered, project, run_key)
    with pipeline_lock(project, f"Prefect flow run {run_key}", lock_timeout_s, log=logger.warning):
        logger.info("Holding the pipeline lock of %s", project)
        for stage in ordered:
            # Called directly: a failed stage raises here, so the flow fails and later stages never start.
            STAGE_TASKS[stage](project, run_key)
    return ordered
