"""MLflow wiring: one parent run per pipeline execution, one nested run per stage.

Each DVC stage is its own process, so the stages find their parent run by the tag
`pipeline_run_key`: the value of PIPELINE_RUN_KEY when set (`make run` and the Prefect flow set it
to a fresh id), else the git commit plus the params hash (so one plain `dvc repro` lands in one run).
"""

from __future__ import annotations

import csv
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pipeline.config import Params, params_hash

RUN_KEY_TAG = "pipeline_run_key"


def tracking_uri(params: Params) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or params.mlflow.tracking_uri


SECRET_KEYS = ("password", "passwd", "pwd", "token", "secret", "key", "credential")


def redact(uri: str) -> str:
    """A URI without credentials: the password of user:password@host and secret-looking query values."""
    parts = urlsplit(uri)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"***@{host}" if user else host
    query = urlencode([(k, "***" if any(s in k.lower() for s in SECRET_KEYS) else v)
                       for k, v in parse_qsl(parts.query, keep_blank_values=True)], safe="*")
    if netloc == parts.netloc and query == urlencode(parse_qsl(parts.query, keep_blank_values=True), safe="*"):
        return uri  # nothing secret (and sqlite:/// stays as written)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def public_params(params: Params) -> dict:
    """The params as they may be logged or tagged: the tracking URI without credentials."""
    raw = params.model_dump(by_alias=True)
    raw["mlflow"]["tracking_uri"] = redact(raw["mlflow"]["tracking_uri"])
    return raw


def git_commit() -> tuple[str, bool]:
    """(commit sha or 'unknown', dirty flag) of the working tree the stage runs in."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, check=True).stdout.strip())
        return sha, dirty
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown", False


SWEEP_RUN_ENV = "PIPELINE_SWEEP_RUN_ID"  # set by pipeline/commands/sweep.py: the MLflow run of the sweep


def run_key(params: Params) -> str:
    key = os.environ.get("PIPELINE_RUN_KEY") or f"{git_commit()[0][:12]}-{params_hash(params)}"
    if os.environ.get(SWEEP_RUN_ENV) and os.environ.get("DVC_EXP_NAME"):
        key = f"{key}-{os.environ['DVC_EXP_NAME']}"  # one run per experiment of a sweep
    return key


def configure(params: Params) -> str:
    """Point MLflow at the store and make sure the experiment exists; return its id."""
    import mlflow

    uri = tracking_uri(params)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(params.mlflow.experiment)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if not uri.startswith(("http://", "https://", "databricks")):
        artifact_root = Path(params.mlflow.artifact_root).resolve()
        artifact_root.mkdir(parents=True, exist_ok=True)
        artifact_location = artifact_root.as_uri()
    try:
        return mlflow.create_experiment(params.mlflow.experiment, artifact_location=artifact_location)
    except mlflow.exceptions.MlflowException:
        # Two runs against one server may both find no experiment and both create it: the second fails on the
        # unique name. Then it exists: use it (anything else is a real error).
        experiment = mlflow.get_experiment_by_name(params.mlflow.experiment)
        if experiment is None:
            raise
        return experiment.experiment_id


@contextmanager
def stage_run(params: Params, stage: str):
    """Open the stage's nested run under the pipeline execution's parent run."""
    import mlflow

    experiment_id = configure(params)
    key = run_key(params)
    found = mlflow.search_runs([experiment_id], filter_string=f"tags.{RUN_KEY_TAG} = '{key}'",
                               output_format="list", max_results=1)
    sha, dirty = git_commit()
    lineage = {"git_commit": sha, "git_dirty": str(dirty), "params_hash": params_hash(params)}
    parent_id = found[0].info.run_id if found else None
    sweep = os.environ.get(SWEEP_RUN_ENV)
    name = os.environ.get("DVC_EXP_NAME") if sweep else None
    # Only the parent carries the key tag, so the search above can never return a stage's run. In a sweep the
    # parent is the experiment's run, a child of the sweep's run.
    with mlflow.start_run(run_id=parent_id, experiment_id=experiment_id,
                          run_name=None if parent_id else (name or f"pipeline-{key}"),
                          tags=None if parent_id else {**lineage, RUN_KEY_TAG: key,
                                                       **({"mlflow.parentRunId": sweep, "dvc_exp": name} if sweep else {})}):
        with mlflow.start_run(run_name=stage, nested=True, experiment_id=experiment_id,
                              tags={**lineage, "stage": stage}) as run:
            yield run


def loss_history(trainer) -> list[dict]:
    """[{step, loss}] from a transformers Trainer's log history."""
    return [{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e]


def write_loss_csv(log: list[dict], path: Path) -> None:
    """The DVC plot file of a loss curve."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "loss"])
        writer.writeheader()
        writer.writerows(log)


def log_loss_curve(log: list[dict], metric: str, csv_path: Path, title: str) -> None:
    """Per-step loss as an MLflow metric, a DVC plot CSV and a PNG artifact."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import mlflow

    for entry in log:
        mlflow.log_metric(metric, entry["loss"], step=entry["step"])
    write_loss_csv(log, csv_path)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([e["step"] for e in log], [e["loss"] for e in log], marker="o", markersize=3)
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    mlflow.log_figure(fig, f"plots/{csv_path.stem}.png")
    plt.close(fig)
