"""Stage `register`: the adapter becomes a new version of a registered model in MLflow.

Only the adapter (and its tokenizer/template) is stored: the base is referenced through MLflow's
`base_model_path` and tagged with its content hash. Alias `champion` moves to the new version only
when it beats both the base and the current champion on the gate metric by `min_improvement`;
otherwise the version gets alias `challenger` and a tag saying why.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import version as pkg_version
from pathlib import Path

import yaml

from pipeline.config import Params, load_params, params_hash, run_cli
from pipeline.modeling import (
    load_causal_lm,
    load_tokenizer,
    model_fingerprint,
    resolve_model,
    template_fingerprint,
)
from pipeline.tracking import git_commit, stage_run, tracking_uri

LIBRARIES = ["torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "mlflow"]


def file_md5(path: str | Path) -> str:
    digest = hashlib.md5()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def promotion_decision(params: Params, metrics: dict, champion: dict[str, float] | None) -> tuple[bool, str]:
    """Whether the new version becomes champion, and why (or why not).

    `champion` holds the current champion's metrics (None when there is none). The gate metric must
    beat the base and the champion by `min_improvement`; guard metrics may not regress against the
    champion by more than their tolerance. The first version has no champion to guard against.
    """
    gate = params.registry.gate_metric
    margin = params.registry.min_improvement
    new = metrics[gate]
    base = metrics[gate.replace("tuned_", "base_", 1)]
    if new < base + margin or new == base:
        return False, f"{gate}={new:.4f} does not beat the base ({base:.4f}) by {margin}"
    if champion is None:
        return True, f"{gate}={new:.4f} beats base {base:.4f} and there is no champion yet"
    if gate in champion and (new < champion[gate] + margin or new == champion[gate]):
        return False, f"{gate}={new:.4f} does not beat the champion ({champion[gate]:.4f}) by {margin}"
    for guard in params.registry.guards:
        if guard.metric not in champion or guard.metric not in metrics:
            continue
        old, value = champion[guard.metric], metrics[guard.metric]
        worse = (old - value) if guard.higher_is_better else (value - old)
        if worse > guard.tolerance * abs(old):
            return False, (f"guard {guard.metric} regressed from {old:.4g} to {value:.4g} "
                           f"(tolerance {guard.tolerance:.0%} relative)")
    return True, f"{gate}={new:.4f} beats base {base:.4f} and the champion {champion.get(gate, float('nan')):.4f}"


def champion_metrics_for(champion, metrics: dict) -> dict[str, float]:
    """The champion's numbers to compare with: measured by this run's evaluate stage on the same items when
    it evaluated this very version (`champion_*` metrics), else the metrics registered with it."""
    if metrics.get("champion_version") == int(champion.version):
        return {k.replace("champion_", "tuned_", 1): v for k, v in metrics.items()
                if k.startswith("champion_") and k != "champion_version"}
    return {k.removeprefix("metric."): float(v) for k, v in champion.tags.items() if k.startswith("metric.")}


def registry_lock(uri: str):
    """A lock around reading and moving aliases, so two registrations cannot interleave.

    Works for the embedded sqlite store (a lock file beside it); a remote tracking server offers no
    lock, so concurrent registrations against one are serialised only by running them one at a time.
    """
    from contextlib import nullcontext

    from filelock import FileLock

    if uri.startswith("sqlite:///"):
        return FileLock(str(Path(uri.removeprefix("sqlite:///")).with_suffix(".registry.lock")), timeout=600)
    return nullcontext()


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


def lineage_tags(params: Params, metrics: dict, base_name: str, tokenizer) -> dict[str, str]:
    sha, dirty = git_commit()
    tags = {
        "git_commit": sha,
        "git_dirty": str(dirty),
        "params_hash": params_hash(params),
        # The exact data trained and evaluated on (validated, normalised); raw inputs are in the dvc.* hashes.
        "data_train_md5": file_md5(Path(params.validation.out_dir) / "train.jsonl"),
        "data_eval_md5": file_md5(Path(params.validation.out_dir) / "eval.jsonl"),
        "data_train_format": params.data.train.format,
        "base_model": params.base.model,
        "base_model_revision": str(params.base.revision),
        "adapter_base_path": base_name,
        "adapter_base_sha256": model_fingerprint(base_name),
        "chat_template_sha256": template_fingerprint(tokenizer),
        "params_json": json.dumps(params.model_dump(by_alias=True), ensure_ascii=False, separators=(",", ":")),
        **dvc_lineage(params.sft.out_dir),
        "seed": str(params.seed),
        # How the adapter was trained, so inference loads the base the same way.
        "sft.quantization": params.sft.quantization,
        "sft.double_quant": str(params.sft.double_quant),
        "sft.compute_dtype": params.sft.compute_dtype,
        **{f"lib.{lib}": pkg_version(lib) for lib in LIBRARIES},
        **{f"metric.{k}": f"{v:.6g}" if isinstance(v, float) else str(v) for k, v in metrics.items()},
    }
    return tags


def register_adapter(params: Params, metrics: dict) -> dict:
    """Log the adapter, register a version, tag its lineage, apply the promotion gate."""
    from peft import PeftModel

    import mlflow
    from mlflow import MlflowClient

    name = params.registry.model_name
    adapter_dir = Path(params.sft.out_dir)
    # The adapter sits on the DAPT output (or the base when DAPT is off): that model is referenced.
    base_name, _ = resolve_model(params.dapt.out_dir)
    base_ref = str(Path(base_name).resolve()) if Path(base_name).is_dir() else base_name
    with stage_run(params, "register") as run:
        tokenizer = load_tokenizer(adapter_dir)
        model = PeftModel.from_pretrained(load_causal_lm(base_name, compute_dtype=params.sft.compute_dtype),
                                          str(adapter_dir))
        mlflow.log_params({"model_name": name, "gate_metric": params.registry.gate_metric,
                           "min_improvement": params.registry.min_improvement})
        mlflow.log_dict(params.model_dump(by_alias=True), "params.json")
        info = mlflow.transformers.log_model(
            {"model": model, "tokenizer": tokenizer},
            name="adapter",
            task="text-generation",
            base_model_path=base_ref,
            pip_requirements=[f"{lib}=={pkg_version(lib)}" for lib in LIBRARIES],
            registered_model_name=name,
        )
        version = str(info.registered_model_version)
        client = MlflowClient()
        tags = lineage_tags(params, metrics, base_name, tokenizer)
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        mlflow.set_tags({k: v for k, v in tags.items() if not k.startswith("metric.")})
        mlflow.log_metrics(metrics)

        with registry_lock(tracking_uri(params)):
            try:
                champion = client.get_model_version_by_alias(name, "champion")
                champion_metrics = champion_metrics_for(champion, metrics)
            except mlflow.exceptions.MlflowException:
                champion, champion_metrics = None, None
            promoted, reason = promotion_decision(params, metrics, champion_metrics)
            alias = "champion" if promoted else "challenger"
            client.set_registered_model_alias(name, alias, version)
            client.set_model_version_tag(name, version, "promotion", reason)
            if promoted and champion is not None:
                client.set_model_version_tag(name, version, "previous_champion", str(champion.version))
        return {"model_name": name, "version": version, "alias": alias, "promoted": promoted, "reason": reason,
                "run_id": run.info.run_id, "model_uri": f"models:/{name}/{version}"}


def main() -> None:
    params = load_params()
    metrics = json.loads(Path("metrics/eval.json").read_text(encoding="utf-8"))
    result = register_adapter(params, metrics)
    out = Path("reports/registry.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"register: {result['model_uri']} -> @{result['alias']} ({result['reason']})")


if __name__ == "__main__":
    run_cli(main)
