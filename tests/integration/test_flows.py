"""The Prefect flow and its served deployment, against a real temporary Prefect server (no mocks).

Only the cheap stages run here; the full pipeline runs end to end in test_pipeline_e2e.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness

from flows.deploy import DEFAULT_CRON
from flows.pipeline_flow import STAGES, finetune_pipeline

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENT = "finetune-pipeline/scheduled"
# Stages the served deployment runs in the test: a cheap one keeps the suite near 10 minutes; every
# stage runs end to end in test_pipeline_e2e.py through the same `dvc repro`.
DEPLOYMENT_STAGES = ["sample_data"]
RUN_TIMEOUT_S = 120  # upper bound for the triggered run


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    """A real temporary Prefect server on 127.0.0.1 (SQLite in a temp dir), stopped at the end.
    Yields its API URL; this process's Prefect client points at it while the fixture is active."""
    home = tmp_path_factory.mktemp("prefect-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_HOME", str(home))  # the server subprocess inherits it
        with prefect_test_harness(server_startup_timeout=60):
            api_url = PREFECT_API_URL.value()
            assert api_url.startswith("http://127.0.0.1:"), api_url
            yield api_url


def lock_stages(project: Path) -> set[str]:
    lock = project / "dvc.lock"
    return set(yaml.safe_load(lock.read_text())["stages"]) if lock.exists() else set()


def test_flow_stages_match_dvc_yaml():
    dvc_stages = list(yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"])
    assert list(STAGES) == dvc_stages


def test_flow_runs_stage_in_process(prefect_server, project_copy):
    state = finetune_pipeline(project_dir=str(project_copy), stages=["sample_data"], return_state=True)
    assert state.is_completed(), state
    assert state.result() == ["sample_data"]
    assert lock_stages(project_copy) == {"sample_data"}
    assert (project_copy / "data" / "sample" / "train.jsonl").exists()


def test_failing_stage_fails_flow_and_stops(prefect_server, project_copy):
    params = project_copy / "params.yaml"
    params.write_text(re.sub(r"n_train: \d+", "n_train: 0", params.read_text(), count=1))

    state = finetune_pipeline(project_dir=str(project_copy), stages=["sample_data", "base"], return_state=True)

    assert state.is_failed(), state
    error = state.result(raise_on_failure=False)
    assert "sample_data" in str(error) and "n_train" in str(error), error  # stderr tail in the message
    assert lock_stages(project_copy) == set()
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 15
        while True:  # task run records reach the API asynchronously
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            if any(r.name == "sample_data" and r.state and r.state.is_final() for r in runs) \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    names = {r.name: r.state.type.value if r.state else None for r in runs}
    assert names == {"sample_data": "FAILED"}, names  # `base` never started


def test_served_deployment_runs_on_temporary_server(prefect_server, project_copy, tmp_path):
    env = {**os.environ,
           "PREFECT_API_URL": prefect_server,
           "PREFECT_HOME": str(tmp_path / "serve-home"),
           "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    env.pop("PIPELINE_CRON", None)  # the default nightly schedule
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        serve = subprocess.Popen([sys.executable, "-m", "flows.deploy"], cwd=project_copy, env=env,
                                 stdout=log, stderr=subprocess.STDOUT)
    try:
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 40
            while True:
                assert serve.poll() is None, f"serve exited early:\n{log_path.read_text()[-3000:]}"
                try:
                    deployment = client.read_deployment_by_name(DEPLOYMENT)
                    break
                except ObjectNotFound:
                    assert time.monotonic() < deadline, f"no deployment yet:\n{log_path.read_text()[-3000:]}"
                    time.sleep(0.5)

        assert [s.schedule.cron for s in deployment.schedules] == [DEFAULT_CRON]
        assert deployment.parameters == {"project_dir": str(project_copy.resolve())}

        flow_run = run_deployment(name=DEPLOYMENT, parameters={"stages": DEPLOYMENT_STAGES},
                                  timeout=RUN_TIMEOUT_S, poll_interval=1)
        assert flow_run.state is not None and flow_run.state.is_completed(), \
            f"{flow_run.state}\n{log_path.read_text()[-3000:]}"
        assert flow_run.parameters["project_dir"] == str(project_copy.resolve())
        assert lock_stages(project_copy) == set(DEPLOYMENT_STAGES)
    finally:
        serve.send_signal(signal.SIGINT)  # serve pauses its schedule and exits on Ctrl-C
        try:
            serve.wait(timeout=20)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()


def lock_events(project: Path) -> list[dict]:
    import json

    path = project / ".dvc/tmp/pipeline-lock.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_two_pipeline_executions_never_interleave(prefect_server, project_copy):
    """A manual run (what `make run` does: `python -m flows.lock dvc repro`) and a Prefect flow run against
    one checkout: the flow waits for the lock, its stages start only after the manual run ended; a flow
    that cannot get the lock in time fails saying who holds it. Two real processes each time."""
    from tests.helpers.project import venv_env

    env = venv_env(PREFECT_API_URL=prefect_server)
    manual = subprocess.Popen([sys.executable, "-m", "flows.lock", sys.executable, "-m", "dvc", "repro",
                               "sample_data", "base"], cwd=project_copy, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not any(e["event"] == "acquired" for e in lock_events(project_copy)):
        assert manual.poll() is None and time.monotonic() < deadline, manual.communicate()[0][-3000:]
        time.sleep(0.1)
    code = ("from flows.pipeline_flow import finetune_pipeline; import sys; "
            "s = finetune_pipeline(project_dir='.', stages=['sample_data', 'base'], return_state=True); "
            "print('STATE', s.type.value); sys.exit(0 if s.is_completed() else 1)")
    scheduled = subprocess.run([sys.executable, "-c", code], cwd=project_copy, env=env, capture_output=True,
                               text=True, timeout=300)
    manual_out = manual.communicate(timeout=300)[0]
    assert manual.returncode == 0, manual_out[-3000:]
    assert scheduled.returncode == 0, (scheduled.stdout + scheduled.stderr)[-3000:]
    assert "waiting for the pipeline lock" in scheduled.stdout + scheduled.stderr
    events = lock_events(project_copy)
    by_pid: dict[int, dict[str, float]] = {}
    for e in events:
        by_pid.setdefault(e["pid"], {})[e["event"]] = e["time"]
    assert len(by_pid) == 2, events
    first, second = sorted(by_pid.values(), key=lambda t: t["acquired"])
    assert "wait" in second and second["wait"] < first["released"] <= second["acquired"], events
    assert lock_stages(project_copy) == {"sample_data", "base"}

    # The lock held (here by a sleeping command) past the flow's timeout: the flow fails and says why.
    holder = subprocess.Popen([sys.executable, "-m", "flows.lock", "sleep", "60"], cwd=project_copy, env=env)
    try:
        deadline = time.monotonic() + 30
        while sum(e["event"] == "acquired" for e in lock_events(project_copy)) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        state = finetune_pipeline(project_dir=str(project_copy), stages=["sample_data"], lock_timeout_s=1,
                                  return_state=True)
        assert state.is_failed(), state
        message = str(state.result(raise_on_failure=False))
        assert "another pipeline execution holds" in message and "sleep 60" in message, message
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.extended
def test_a_scheduled_run_trains_only_when_the_data_changed(prefect_server, project_copy, tiny_world):
    """Bring-your-own data (files the user edits, not a stage's output): the first run trains; the next one, with
    nothing changed, ends as "up to date" before any stage (no task, so no model loaded); after one training item
    is added, exactly the stages downstream of the training data run, and the report says which."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from tests.helpers.project import TINY_BASE, git

    own = project_copy / "data/own"
    shutil.copytree(tiny_world.data, own)
    # The repository as shipped: data/real/dvc.yaml's import stages sit beside dvc.yaml, their outputs absent.
    (project_copy / "data/real").mkdir(parents=True)
    for name in ("dvc.yaml", "dvc.lock", ".gitignore"):
        if (REPO_ROOT / "data/real" / name).is_file():
            shutil.copy2(REPO_ROOT / "data/real" / name, project_copy / "data/real" / name)
    git(project_copy, "add", "data/own", "data/real")
    git(project_copy, "commit", "-q", "-m", "our own data")
    data = {"train": "train.jsonl", "validation": "validation.jsonl", "eval": "eval.jsonl",
            "domain_corpus": "domain_train.txt", "domain_eval": "domain_eval.txt", "general_eval": "general_eval.txt"}
    overrides = ([f"data.{k}.path=data/own/{v}" for k, v in data.items()]
                 + [f"base.tiny.{k}={v}" for k, v in TINY_BASE.items()]
                 + ["dapt.max_steps=10", "sft.max_steps=10", "sft.eval_steps=5", "sft.save_steps=5"])

    committed = (project_copy / "params.yaml").read_text(encoding="utf-8")
    first = finetune_pipeline(project_dir=str(project_copy), overrides=overrides, only_if_changed=True,
                              return_state=True)
    assert first.is_completed(), first
    assert first.result() == list(STAGES)
    # The overrides were this run's only: the checkout's params.yaml is as committed for the next user's run.
    assert (project_copy / "params.yaml").read_text(encoding="utf-8") == committed

    start = time.monotonic()
    again = finetune_pipeline(project_dir=str(project_copy), overrides=overrides, only_if_changed=True,
                              return_state=True)
    quiet_seconds = time.monotonic() - start
    assert again.is_completed() and again.result() == []
    run_id = again.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        report = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    assert tasks == [], [t.name for t in tasks]  # no stage started: nothing was loaded
    assert "Up to date, nothing to train" in report[0].data
    print(f"unchanged check: {quiet_seconds:.1f} s")

    lines = (own / "train.jsonl").read_text(encoding="utf-8").splitlines()
    item = json.loads(lines[0])
    item["id"] = "added-after-the-first-run"
    item["question"] = item["question"] + " (새 문항)"
    (own / "train.jsonl").write_text("\n".join([*lines, json.dumps(item, ensure_ascii=False)]) + "\n", encoding="utf-8")
    changed = finetune_pipeline(project_dir=str(project_copy), overrides=overrides, only_if_changed=True,
                                return_state=True)
    assert changed.is_completed(), changed
    # sample_data and base do not read data/own/train.jsonl (the tiny base's tokenizer is built from the sample
    # data); dapt reads the validated directory (TAPT may use the train split), so it reruns too.
    assert changed.result() == ["validate", "dapt", "sft", "evaluate", "register"], changed.result()
