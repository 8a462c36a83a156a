"""Stage `register`: the adapter becomes a new version of a registered model in MLflow.

Only the adapter (and its tokenizer/template) is stored with the version; the base it sits on is the
version's own too: a local base (the built-in model, a DAPT output) is logged once per distinct sha256
as a `base` artifact that later runs cannot overwrite, a hub base is referenced with its pinned
revision. The version is created with every lineage tag in one call, and registering the same adapter
again (a retry, a rerun) adopts the existing version instead of adding a duplicate. Alias `champion`
moves to the new version only when it beats both the base and the current champion on the gate metric
by `min_improvement`, in the metric's direction (accuracy up, loss/perplexity down); otherwise the
version gets alias `challenger`. Tag `promotion` says why, and which champion numbers were compared.
Then the version gets its model card (pipeline/registry/model_card.py): README.md in its files, its description,
the run's `model_card.md` and reports/model_card.md. The registry lock is held from the registry read to the
alias move, not during the uploads.

The gate is pipeline/registry/gate.py, the lineage tags pipeline/registry/lineage.py; this module logs,
registers and moves aliases.
"""

from __future__ import annotations

import json
from importlib.metadata import version as pkg_version
from pathlib import Path

from pipeline.artifacts import CHAMPION_SCORED, EVAL_METRICS, MODEL_CARD, REGISTRATION, file_sha256
from pipeline.cli import run_cli
from pipeline.config import Params, load_params
from pipeline.modeling.loading import (
    load_causal_lm,
    load_tokenizer,
    local_base,
    model_fingerprint,
    resolve_model,
)
from pipeline.modeling.precision import trained_precision
from pipeline.registry.gate import decide, registered_metrics
from pipeline.registry.lineage import LIBRARIES, lineage_tags
from pipeline.registry.lock import registry_lock
from pipeline.registry.model_card import attach_model_card, model_card
from pipeline.registry.read import existing_version
from pipeline.serving import make_servable
from pipeline.tracking import RUN_KEY_TAG, configure, public_params, stage_run, tracking_uri


def base_artifact(client, experiment_id: str, base_dir: str, revision: str | None) -> dict:
    """The base the adapter sits on, made the version's own.

    A local model directory (the built-in base, a DAPT output) is logged once per distinct sha256 as the
    artifact `base` of a run tagged `base_sha256`, and later versions with the same base reuse it, so a
    later DAPT run that overwrites models/dapt cannot break an older version. A hub id is not copied:
    it is referenced with its pinned revision (hub commits are content-addressed)."""
    if not Path(base_dir).is_dir():
        return {"uri": f"hub:{base_dir}", "revision": revision, "sha256": model_fingerprint(base_dir, revision),
                "local": base_dir}
    digest = model_fingerprint(base_dir)
    found = client.search_runs([experiment_id], filter_string=f"tags.base_sha256 = '{digest}' and "
                               "attributes.status = 'FINISHED'", max_results=1)
    if found:
        run_id = found[0].info.run_id
    else:
        run = client.create_run(experiment_id, run_name=f"base-{digest[:12]}",
                                tags={"base_sha256": digest, "stage": "base_artifact"})
        run_id = run.info.run_id
        client.log_artifacts(run_id, base_dir, "base")
        client.set_terminated(run_id)
    uri = f"runs:/{run_id}/base"
    return {"uri": uri, "revision": None, "sha256": digest, "local": str(local_base(uri, digest))}


def register_adapter(params: Params, metrics: dict, scored: dict) -> tuple[dict, str]:
    """Log the adapter, register a version with its lineage, apply the promotion gate, attach the model card.

    Idempotent: the version is created with all its tags at once (never an untagged version), and a
    rerun or retry with the same adapter (same sha256) adopts the version already made instead of
    adding a duplicate; a version whose gate already ran keeps its decision, one with a card keeps it.
    The uploads (base artifact, adapter) happen before the registry lock is taken: the lock is held only to
    read the registry, register the version, decide and move aliases, so a large upload never blocks another
    registration. Returns the registration record (reports/registry.json) and the version's card (markdown)."""
    from mlflow import MlflowClient

    import mlflow

    name = params.registry.model_name
    adapter_dir = Path(params.sft.out_dir)
    adapter_sha256 = file_sha256(adapter_dir / "adapter_model.safetensors")
    with registry_lock(tracking_uri(params), name):
        configure(params)  # a fresh sqlite store gets its schema from one process at a time, not two at once
    with stage_run(params, "register") as run:
        client = MlflowClient()
        version = existing_version(client, name, adapter_sha256)
        mlflow.log_params({"model_name": name, "gate_metric": params.registry.gate_metric,
                           "min_improvement": params.registry.min_improvement})
        mlflow.log_metrics(metrics)
        logged = None if version is not None else log_adapter(params, client, run, metrics, adapter_sha256)
        with registry_lock(tracking_uri(params), name) as held:
            if logged is not None:  # another registration of the same adapter may have finished meanwhile
                version = existing_version(client, name, adapter_sha256)
            if version is not None:
                print(f"register: adapter {adapter_sha256[:12]} is already version {version.version}; adopting it")
                mlflow.set_tag("adopted_version", version.version)
            else:
                held.check()
                version = mlflow.register_model(logged["uri"], name, tags=logged["tags"])  # version + tags at once
            promoted, alias, reason = decide(params, client, name, client.get_model_version(name, version.version),
                                             metrics, scored, held)
        result = {"model_name": name, "version": str(version.version), "alias": alias, "promoted": promoted,
                  "reason": reason, "run_id": run.info.run_id, "model_uri": f"models:/{name}/{version.version}",
                  "adapter_sha256": adapter_sha256}
        # The card describes the version as registered (its tags and metrics), also when it is adopted.
        version = client.get_model_version(name, version.version)
        as_trained = params.model_copy(update={"sft": trained_precision(params).sft})
        card, attached = attach_model_card(client, version, model_card(
            as_trained, registered_metrics(version.tags) or metrics, version.tags, result))
        print(f"register: {'model card attached to' if attached else 'keeping the model card of'} version "
              f"{version.version}")
        mlflow.log_text(card, "model_card.md")
        return result, card


def log_adapter(params: Params, client, run, metrics: dict, adapter_sha256: str) -> dict:
    """Upload what a new version is made of (outside the registry lock): the base artifact (once per base), the
    adapter as an MLflow transformers model, the params; returns the model URI and the version's lineage tags.

    The model is loaded on the CPU: registering only serialises it, and a GPU here would be taken outside the
    training slot that keeps two runs off one device."""
    from peft import PeftModel

    import mlflow

    adapter_dir = Path(params.sft.out_dir)
    trained = trained_precision(params).sft  # the precision it was trained in (`auto` resolved by sft)
    base_name, revision = resolve_model(params.dapt.out_dir)  # the adapter sits on the DAPT output (or the base)
    base = base_artifact(client, run.info.experiment_id, base_name, revision)
    tokenizer = load_tokenizer(adapter_dir)
    model = PeftModel.from_pretrained(load_causal_lm(base["local"], revision=revision, on_cpu=True,
                                                     compute_dtype=trained.compute_dtype), str(adapter_dir))
    mlflow.log_dict(public_params(params), "params.json")
    info = mlflow.transformers.log_model(
        {"model": model, "tokenizer": tokenizer}, name="adapter", task="text-generation",
        base_model_path=base["local"], pip_requirements=[f"{lib}=={pkg_version(lib)}" for lib in LIBRARIES])
    tags = lineage_tags(params, metrics, base, tokenizer, adapter_sha256)
    make_servable(client, info.model_id, tags)  # `mlflow models serve` answers MCQ and chat (pipeline/serving.py)
    # The run key stays on the version only: on the run it would make stage_run's parent search find
    # this stage run instead of the pipeline's run, and a later stage of the same key nest under it.
    mlflow.set_tags({k: v for k, v in tags.items() if not k.startswith("metric.") and k != RUN_KEY_TAG})
    return {"uri": info.model_uri, "tags": tags}


def main() -> None:
    params = load_params()
    metrics = json.loads(EVAL_METRICS.read_text(encoding="utf-8"))
    scored = json.loads(CHAMPION_SCORED.read_text(encoding="utf-8")) if CHAMPION_SCORED.is_file() else {}
    result, card = register_adapter(params, metrics, scored)
    REGISTRATION.parent.mkdir(parents=True, exist_ok=True)
    REGISTRATION.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    MODEL_CARD.write_text(card, encoding="utf-8")
    print(f"register: {result['model_uri']} -> @{result['alias']} ({result['reason']})")


if __name__ == "__main__":
    run_cli(main)
