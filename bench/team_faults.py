"""Faults on the team servers, timed: `.venv/bin/python bench/team_faults.py [--out bench/results-team-faults.json]`.

The layout `make team-up` ships (PostgreSQL, MLflow and Prefect servers with their credentials, two workers in one
checkout; flows/team.py) on 127.0.0.1 in a temporary directory, the tests' tiny pipeline (tests/helpers/project.py
TINY_BASE, TINY_SAMPLE). Each fault is injected into a real triggered deployment run, and what follows is timed:

1. sigkill-training: the training process of a run (`sft.max_steps=400`) is killed with SIGKILL once it has
   written a checkpoint; that run ends, then a run with other params (`sft.max_steps=130`) is triggered and must
   complete with no manual cleanup: the Prefect concurrency slot free again, the checkout's pipeline lock free,
   every version with its tags.
2. postgres-restart: PostgreSQL (behind both servers and the registry lock) is stopped (`pg_ctl stop -m fast`:
   every connection cut) and started again while a run trains; what the run does, and whether the next run
   completes.
3. mlflow-down-in-register: the MLflow server is stopped while a run is in its `register` stage: register retries
   (PIPELINE_REGISTRY_RETRIES, default 6 attempts, ~1 min of backoff), then fails with a clear message, leaving no
   version without its tags; the server is started again and the run retriggered with the same params.

Prints one line per event and writes the results as JSON. Takes about 25 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers.postgres import free_port  # noqa: E402
from tests.helpers.project import MODEL_NAME, TINY_BASE, TINY_SAMPLE, make_project_copy  # noqa: E402

FAST = ([f"base.tiny.{k}={v}" for k, v in TINY_BASE.items()] + [f"sample_data.{k}={v}" for k, v in TINY_SAMPLE.items()]
        + ["dapt.max_steps=30", "sft.eval_steps=20", "sft.save_steps=20"])
T0 = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f} s] {message}", flush=True)


def stage_process(checkout: Path, stage: str, timeout: float = 1200) -> psutil.Process:
    """The process running `pipeline.stages.<stage>` in the checkout, once it appears."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in psutil.process_iter(["cmdline", "cwd"]):
            try:
                if f"pipeline.stages.{stage}" in " ".join(proc.info["cmdline"] or []) and \
                        Path(proc.info["cwd"] or "/").resolve() == checkout.resolve():
                    return proc
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.5)
    raise TimeoutError(f"no {stage} process within {timeout} s")


def trigger(max_steps: int):
    from prefect.deployments import run_deployment

    return run_deployment("finetune-pipeline/train", parameters={"overrides": FAST + [f"sft.max_steps={max_steps}"]},
                          timeout=0).id


def wait_final(run_id, timeout: float = 1800):
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(run_id)
            if run.state is not None and run.state.is_final():
                return run
            time.sleep(2)
    raise TimeoutError(f"flow run {run_id} not final within {timeout} s")


def failure_line(run_id) -> str:
    """The last log line that says why a run failed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = [entry.message for entry in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
            any_=[run_id])))]
    useful = [line for entry in logs for line in entry.splitlines()
              if any(word in line for word in ("error", "Error", "failed", "Failed", "registry:"))]
    return (useful or logs or ["(no log)"])[-1][:400]


def leftovers(team, checkout: Path) -> dict:
    """What a finished run may leave behind: the training slot, the checkout's pipeline lock, untagged versions."""
    from mlflow import MlflowClient

    from flows.lock import PipelineBusy, pipeline_lock

    slots = json.loads(team.prefect("global-concurrency-limit", "inspect", "training", "--output", "json"))
    try:
        with pipeline_lock(checkout, "bench: is the lock free?", timeout=0):
            lock = "free"
    except PipelineBusy:
        lock = "held"
    client = MlflowClient(team.urls()["MLFLOW_TRACKING_URI"])
    versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    return {"training_slots_active": slots["active_slots"], "pipeline_lock": lock, "versions": len(versions),
            "versions_without_promotion_tag": sorted(v.version for v in versions if "promotion" not in v.tags)}


def timed_run(label: str, max_steps: int):
    """Trigger a run and wait for its end: (the flow run, seconds it took)."""
    start = time.monotonic()
    run = wait_final(trigger(max_steps))
    took = time.monotonic() - start
    say(f"{label}: {run.state.name} after {took:.0f} s")
    return run, took


def sigkill_training(team, checkout: Path) -> dict:
    run = trigger(400)
    sft = stage_process(checkout, "sft")
    checkpoints = checkout / "checkpoints" / "sft"
    while not any(checkpoints.glob("*/checkpoint-*")):
        time.sleep(0.5)
    killed = time.monotonic()
    os.kill(sft.pid, signal.SIGKILL)
    say(f"sigkill-training: killed sft (pid {sft.pid}) after its first checkpoint")
    first = wait_final(run)
    ended = time.monotonic() - killed
    say(f"sigkill-training: the killed run is {first.state.name} {ended:.0f} s later")
    second, took = timed_run("sigkill-training: the next run (other params)", 130)
    return {"killed_run": first.state.name, "killed_run_final_after_s": round(ended, 1),
            "killed_run_says": failure_line(run), "next_run": second.state.name, "next_run_s": round(took, 1),
            "next_run_says": "" if second.state.is_completed() else failure_line(second.id),
            **leftovers(team, checkout)}


def postgres_restart(team, checkout: Path) -> dict:
    import subprocess

    from flows.team import as_server_user, pg_tool

    run = trigger(150)
    stage_process(checkout, "sft")
    start = time.monotonic()
    # As an operator restarts it: a fast shutdown (every connection cut), then the team's own start (its options,
    # its log file; `pg_ctl restart` would hand the new server this process's pipes).
    proc = subprocess.run(as_server_user([pg_tool("pg_ctl"), "-D", str(team.root / "pg"), "-m", "fast", "-w",
                                          "stop"]), capture_output=True, text=True)
    team.start_postgres()
    restart = time.monotonic() - start
    say(f"postgres-restart: pg_ctl stop -m fast -> {proc.returncode}, started again; {restart:.1f} s")
    first = wait_final(run)
    total = time.monotonic() - start
    say(f"postgres-restart: the run is {first.state.name} {total:.0f} s after the restart began")
    second, took = timed_run("postgres-restart: the next run", 170)
    return {"pg_stop_rc": proc.returncode, "pg_down_and_up_s": round(restart, 1), "run": first.state.name,
            "run_final_after_s": round(total, 1), "run_says": "" if first.state.is_completed() else failure_line(run),
            "next_run": second.state.name, "next_run_s": round(took, 1), **leftovers(team, checkout)}


def mlflow_down_in_register(team, checkout: Path) -> dict:
    from flows.processes import stop_group

    before = leftovers(team, checkout)["versions"]
    run = trigger(190)
    stage_process(checkout, "register")
    down = time.monotonic()
    stop_group(team.state["processes"]["mlflow"])
    say("mlflow-down-in-register: MLflow server stopped while register runs")
    first = wait_final(run)
    failed_after = time.monotonic() - down
    says = failure_line(run)
    say(f"mlflow-down-in-register: the run is {first.state.name} {failed_after:.0f} s later: {says[:160]}")
    team.start_mlflow()
    after_failure = leftovers(team, checkout)
    second, took = timed_run("mlflow-down-in-register: with the server back, the same params again", 190)
    return {"run": first.state.name, "run_final_after_s": round(failed_after, 1), "run_says": says,
            "versions_before": before, "after_failure": after_failure, "retry_run": second.state.name,
            "retry_run_s": round(took, 1), **leftovers(team, checkout)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "bench" / "results-team-faults.json"))
    parser.add_argument("--only", nargs="+", choices=("sigkill-training", "postgres-restart", "mlflow-down-in-register"),
                        help="these faults only (after a baseline run), their results merged into --out")
    args = parser.parse_args()
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    from flows.team import Team

    root = Path(tempfile.mkdtemp(prefix="team-faults-", dir="/tmp"))
    root.chmod(0o711)  # PostgreSQL runs as its own user when this runs as root
    checkout = make_project_copy(root / "project")
    team = Team(root / "state", {"pg": free_port(), "mlflow": free_port(), "prefect": free_port()})
    out = Path(args.out)
    # --only reruns one fault and keeps the others' results.
    results = json.loads(out.read_text(encoding="utf-8")) if args.only and out.exists() else {}
    results.update({"machine": os.uname().machine, "cpus": len(os.sched_getaffinity(0))})
    try:
        team.up([checkout, checkout], checkout)
        say("team up: PostgreSQL, MLflow, Prefect, two workers in one checkout")
        os.environ.update({k: v for k, v in team.credentials.client_env().items() if k.startswith("MLFLOW")})
        with temporary_settings({PREFECT_API_URL: team.urls()["PREFECT_API_URL"],
                                 PREFECT_API_AUTH_STRING: team.credentials.read()["prefect_auth_string"]}):
            baseline, took = timed_run("baseline run", 60)  # also builds what later runs share (data, base, DAPT)
            results["baseline_run" if not args.only else f"baseline_run_before_{'+'.join(args.only)}"] = {
                "state": baseline.state.name, "s": round(took, 1)}
            for name, fault in [("sigkill-training", sigkill_training), ("postgres-restart", postgres_restart),
                                ("mlflow-down-in-register", mlflow_down_in_register)]:
                if args.only is None or name in args.only:
                    results[name] = fault(team, checkout)
                    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    finally:
        team.down()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
