"""The team path on real servers, on loopback, in the layout `make team-up` ships: PostgreSQL, an MLflow server and
a Prefect server on it (both asking for the team's credentials), two process workers in one checkout
(flows/team.py, prefect.yaml). No emulator, no mock.

- Two triggered deployment runs with different overrides train, register and report one at a time (the
  checkout's pipeline lock, then the Prefect global concurrency limit); each version carries its own run's
  params, and params.yaml is as committed afterwards: one user's overrides never reach the other's run.
- Concurrent registrations from two processes, many rounds: the PostgreSQL advisory lock keeps every
  promotion in the champion chain. Then rollback, predict from @champion and the UIs, against the servers.
- No password in any tag, param, log or committed file; nothing left running after `down`.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.postgres import free_port
from tests.helpers.project import MODEL_NAME, TINY_BASE, TINY_SAMPLE, git, make_project_copy, venv_env

pytestmark = pytest.mark.extended

# A short pipeline: the tests' tiny base and sample sizes, few steps (the run, not the numbers, is under test).
FAST = ([f"base.tiny.{k}={v}" for k, v in TINY_BASE.items()] + [f"sample_data.{k}={v}" for k, v in TINY_SAMPLE.items()]
        + ["dapt.max_steps=30", "sft.eval_steps=20", "sft.save_steps=20"])
RACE_ROUNDS = 12
RUN_TIMEOUT_S = 1500


@pytest.fixture(scope="module")
def team():
    from flows.processes import group_members
    from flows.team import Team

    # PostgreSQL runs as the `postgres` user when the tests run as root: it must be able to enter the directory.
    root = Path(tempfile.mkdtemp(prefix="team-test-", dir="/tmp"))
    root.chmod(0o711)
    checkout = make_project_copy(root / "project")
    checkouts = [checkout, checkout]  # as shipped: `make team-up` starts both workers in the one checkout
    started = Team(root / "state", {"pg": free_port(), "mlflow": free_port(), "prefect": free_port()})
    start = time.monotonic()
    # MLflow's clients may set the URI; the credentials are for this module's in-process clients only.
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    saved = {k: os.environ.get(k) for k in keys}
    try:
        started.up(checkouts, checkouts[0])
        print(f"team up in {time.monotonic() - start:.1f} s")
        os.environ.update({k: v for k, v in started.credentials.client_env().items() if k.startswith("MLFLOW")})
        yield started, checkouts
    finally:
        pids = dict(started.state.get("processes", {}))
        started.down()
        left = [name for name, pid in pids.items() if group_members(pid)]
        assert not left, f"still running after down: {left}"
        assert not (root / "state/pg/postmaster.pid").exists(), "PostgreSQL still running after down"
        shutil.rmtree(root, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def prefect_settings(team):
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    return temporary_settings({PREFECT_API_URL: team.urls()["PREFECT_API_URL"],
                               PREFECT_API_AUTH_STRING: team.credentials.read()["prefect_auth_string"]})


def client_vars(team) -> dict[str, str]:
    return {**team.urls(), **team.credentials.client_env()}


def wait_final(client, ids: list, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        runs = [client.read_flow_run(i) for i in ids]
        if all(r.state is not None and r.state.is_final() for r in runs):
            return runs
        assert time.monotonic() < deadline, [(r.name, r.state) for r in runs]
        time.sleep(3)


def passwords(team) -> list[str]:
    files = [team.pgpass, *team.secrets.glob("pgpass-*")]
    saved = team.credentials.read()
    return [line.split(":")[4] for path in files for line in path.read_text(encoding="utf-8").splitlines()] + [
        saved["mlflow_password"], saved["prefect_auth_string"].split(":", 1)[1]]


def test_two_triggered_runs_train_one_at_a_time_register_and_report(team):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.deployments import run_deployment

    from flows.pipeline_flow import TRAINING_STAGES
    from mlflow import MlflowClient

    server, checkouts = team
    start = time.monotonic()
    with prefect_settings(server):
        # Different step counts: two different adapters (the same params would train the same bytes, which
        # register adopts as the version already there).
        triggered = [run_deployment("finetune-pipeline/train", parameters={"overrides": FAST + [f"sft.max_steps={n}"]},
                                    timeout=0) for n in (40, 60)]
        with get_client(sync_client=True) as client:
            runs = wait_final(client, [r.id for r in triggered], RUN_TIMEOUT_S)
            elapsed = time.monotonic() - start
            print(f"two deployment runs finished in {elapsed:.1f} s")
            logs = {r.id: "\n".join(entry.message for entry in client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id])))) for r in runs}
            for r in runs:
                assert r.state.is_completed(), (r.state, logs[r.id][-3000:])
            windows = []
            for r in runs:
                tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id])))
                training = [t for t in tasks if t.name in TRAINING_STAGES]
                assert {t.name for t in training} == set(TRAINING_STAGES), [t.name for t in tasks]
                windows.append((min(t.start_time for t in training), max(t.end_time for t in training), r.id))
            artifacts = {r.id: client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[r.id]))) for r in runs}
    # One training at a time in the one checkout; the second run either waited for the first's pipeline lock (the
    # other worker took it at once) or started after the first had ended.
    assert (checkouts[0] / "models/adapter/adapter_model.safetensors").is_file()
    (first_start, first_end, first_id), (second_start, _, second_id) = sorted(windows)
    assert first_end <= second_start, windows
    by_id = {r.id: r for r in runs}
    assert ("waiting for the pipeline lock" in logs[second_id]
            or by_id[second_id].start_time >= by_id[first_id].end_time), logs[second_id][-3000:]
    # The overrides applied to their own run only: params.yaml is as committed again.
    assert git(checkouts[0], "diff", "--stat", "HEAD", "--", "params.yaml").stdout == ""
    # Each run's markdown report: metrics table, promotion, links into the MLflow server.
    mlflow_url = server.urls()["MLFLOW_TRACKING_URI"]
    for run_artifacts in artifacts.values():
        report = next(a for a in run_artifacts if a.key == "finetune-report")
        assert report.type == "markdown"
        assert "| tuned |" in report.data and "Promotion: version" in report.data, report.data
        assert f"{mlflow_url}/#/models/{MODEL_NAME}/versions/" in report.data, report.data

    client = MlflowClient(tracking_uri=mlflow_url)
    versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    # Each version was trained with its own run's override, not the other run's.
    assert sorted(json.loads(v.tags["params_json"])["sft"]["max_steps"] for v in versions) == [40, 60]
    heads = {git(c, "rev-parse", "HEAD").stdout.strip() for c in checkouts}
    for v in versions:
        assert v.tags["git_commit"] in heads and "promotion" in v.tags
        assert v.source.startswith(("mlflow-artifacts:", "models:/")), v.source  # proxied: no client path
    # Passwords live only in the team's pgpass: never in a tag, a param, a server log or the project files.
    secrets = passwords(server)
    experiment = client.get_experiment(client.get_run(versions[0].run_id).info.experiment_id)
    for run in client.search_runs([experiment.experiment_id]):
        blob = json.dumps([run.data.tags, run.data.params])
        assert not any(s in blob for s in secrets)
    assert not any(s in json.dumps([v.tags for v in versions]) for s in secrets)
    for log in (p for p in server.logs.rglob("*") if p.is_file()):
        assert not any(s in log.read_text(encoding="utf-8", errors="replace") for s in secrets), log
    for checkout in set(checkouts):
        tracked = git(checkout, "ls-files").stdout.split()
        assert not any(s in (checkout / f).read_text(encoding="utf-8", errors="replace")
                       for f in tracked if (checkout / f).is_file() for s in secrets)
    # The artifacts sit on the server's side (proxied), not in the checkouts.
    assert any((server.root / "artifacts").rglob("adapter_model.safetensors"))


def race_versions(client, name: str, count: int) -> list[str]:
    experiment = client.get_experiment_by_name("Default").experiment_id
    run = client.create_run(experiment, run_name="race-fixture")
    client.log_text(run.info.run_id, "x", "model/placeholder.txt")
    client.set_terminated(run.info.run_id)
    return [client.create_model_version(name, f"{run.info.artifact_uri}/model", run.info.run_id).version
            for _ in range(count)]


def champion_chain(client, name: str) -> list[str]:
    chain, version = [], client.get_model_version_by_alias(name, "champion")
    while True:
        chain.append(str(version.version))
        previous = version.tags.get("previous_champion")
        if previous is None:
            return chain
        version = client.get_model_version(name, previous)


def race(server, checkout: Path, name: str, rounds: int, locked: bool) -> tuple[int, list[str]]:
    """`rounds` rounds of two processes deciding two new, better versions at the same moment. Returns the rounds
    after which a promoted version is missing from the champion chain, and the outputs."""
    from mlflow import MlflowClient

    env = venv_env(**client_vars(server))
    if not locked:
        env.pop("PIPELINE_REGISTRY_LOCK_URL")
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    client.create_registered_model(name)
    broken, outputs = 0, []
    for round_ in range(rounds):
        accuracy = 0.1 + 0.05 * round_
        pair = race_versions(client, name, 2)
        for version, acc in zip(pair, (accuracy, accuracy + 0.01), strict=True):
            client.set_model_version_tag(name, version, "metric.tuned_accuracy", str(acc))
        at = time.time() + 1.5
        procs = [subprocess.Popen([sys.executable, "-m", "tests.helpers.team_race", name, v, str(a), str(at)], cwd=checkout,
                                  env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for v, a in zip(pair, (accuracy, accuracy + 0.01), strict=True)]
        crashed = False
        for p in procs:
            out = p.communicate(timeout=120)[0]
            if p.returncode and not locked and "UniqueViolation" in out:
                crashed = True  # unlocked, both inserted alias `champion` at once: the database refused one
                continue
            assert p.returncode == 0, out[-3000:]
            outputs.append(out.strip().splitlines()[-1])
        # Every version a process promoted ("version 7: champion (...)") must be in the chain.
        promoted = {line.split()[1].rstrip(":") for line in outputs if line.split()[2] == "champion"}
        if crashed or promoted - set(champion_chain(client, name)):
            broken += 1
    return broken, outputs


def test_concurrent_registrations_keep_every_promotion_in_the_chain_then_rollback_and_predict(team):
    from mlflow import MlflowClient

    server, checkouts = team
    start = time.monotonic()
    broken, outputs = race(server, checkouts[0], "race-locked", RACE_ROUNDS, locked=True)
    print(f"{RACE_ROUNDS} locked rounds in {time.monotonic() - start:.1f} s")
    assert broken == 0, outputs
    print("\n".join(outputs))
    client = MlflowClient(tracking_uri=server.urls()["MLFLOW_TRACKING_URI"])
    chain = champion_chain(client, "race-locked")
    # The chain is exactly the promoted versions, and every round's better version (the even ones) is in it:
    # it beats everything decided before it, whichever process went first.
    promoted = {line.split()[1].rstrip(":") for line in outputs if line.split()[2] == "champion"}
    assert set(chain) == promoted and {str(v) for v in range(2, 2 * RACE_ROUNDS + 1, 2)} <= promoted, (chain, outputs)
    # Without the lock the same rounds lose promotions (reported, not asserted: a race is a race).
    unlocked, _ = race(server, checkouts[0], "race-unlocked", RACE_ROUNDS, locked=False)
    print(f"without the registry lock: {unlocked} of {RACE_ROUNDS} rounds lost a promotion from the chain")

    env = venv_env(**client_vars(server))
    rollback = subprocess.run([sys.executable, "-m", "pipeline.commands.rollback", "--model-name", "race-locked"],
                              cwd=checkouts[0], env=env, capture_output=True, text=True, timeout=120)
    assert rollback.returncode == 0, rollback.stderr[-3000:]
    assert client.get_model_version_by_alias("race-locked", "champion").version == chain[1]

    # predict from the real pipeline's champion (the deployment test registered it), through the server.
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")  # raises if the gate promoted neither
    predict = subprocess.run([sys.executable, "-m", "pipeline.commands.predict", "--model-uri", f"models:/{MODEL_NAME}@champion",
                              "--input", "data/sample/eval.jsonl"], cwd=checkouts[0], env=env, capture_output=True,
                             text=True, timeout=300)
    assert predict.returncode == 0, predict.stderr[-3000:]
    rows = [json.loads(line) for line in predict.stdout.splitlines()]
    assert len(rows) == TINY_SAMPLE["n_eval"] and all(1 <= r["prediction"] <= 5 for r in rows), predict.stdout[-2000:]
    assert f"models:/{MODEL_NAME}/{champion.version}" in predict.stderr

    # The UIs answer: MLflow's page and its registry API, Prefect's page and API.
    mlflow_url = server.urls()["MLFLOW_TRACKING_URI"]
    saved = server.credentials.read()
    login = {"Authorization": "Basic " + base64.b64encode(
        f"{saved['mlflow_username']}:{saved['mlflow_password']}".encode()).decode()}
    with urllib.request.urlopen(urllib.request.Request(f"{mlflow_url}/", headers=login), timeout=30) as page:
        assert page.status == 200 and b"MLflow" in page.read()
    with urllib.request.urlopen(urllib.request.Request(f"{mlflow_url}/ajax-api/2.0/mlflow/registered-models/search",
                                                       headers=login), timeout=30) as api:
        names = {m["name"] for m in json.load(api)["registered_models"]}
    assert {MODEL_NAME, "race-locked"} <= names
    prefect_url = server.urls()["PREFECT_API_URL"].removesuffix("/api")
    with urllib.request.urlopen(f"{prefect_url}/api/health", timeout=30) as health:
        assert json.load(health) is True
