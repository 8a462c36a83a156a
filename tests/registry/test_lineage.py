"""Lineage pins what it names: a hub base at its pinned revision everywhere, stop tokens from a hub model's
generation_config, no credentials from a tracking URI in tags or logs.

A hub model is made offline the way the Hugging Face cache stores one (models--org--name/snapshots/<commit>,
refs/main), with two commits of different weights: everything must load the pinned one, never `main`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.project import REPO_ROOT, venv_env
from tests.helpers.tiny_chat_models import build_tiny_chat_model

REPO_ID = "acme/tiny-gemma3-it"
PINNED, LATEST = "a" * 40, "b" * 40

CHECKS = r"""
import json, sys
from pathlib import Path
import mlflow, torch
from mlflow import MlflowClient
from transformers import AutoTokenizer
from pipeline.modeling.chat_template import stop_token_ids
from pipeline.modeling.loading import load_causal_lm, model_fingerprint, write_model_ref
from pipeline.stages.register import base_artifact
from pipeline.registry.read import registered_base

repo, pinned, work = sys.argv[1], sys.argv[2], Path(sys.argv[3])
out = {}
tok = AutoTokenizer.from_pretrained(repo, revision=pinned)
out["stop_tokens"] = sorted(tok.convert_ids_to_tokens(sorted(stop_token_ids(repo, tok, pinned))))
write_model_ref(work / "base", repo, pinned)  # what the base stage writes for a hub id
out["ref_stop_tokens"] = sorted(tok.convert_ids_to_tokens(sorted(stop_token_ids(work / "base", tok))))
weight = lambda m: m.model.embed_tokens.weight.detach().clone()
out["ref_loads_pinned"] = torch.equal(weight(load_causal_lm(work / "base")), weight(load_causal_lm(repo, revision=pinned)))
out["pinned_differs_from_latest"] = not torch.equal(weight(load_causal_lm(repo, revision=pinned)), weight(load_causal_lm(repo)))
out["fingerprint"] = model_fingerprint(repo, pinned)
mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
client = MlflowClient()
experiment = mlflow.create_experiment("lineage", artifact_location=(work / "artifacts").as_uri())
base = base_artifact(client, experiment, repo, pinned)
out["base"] = {k: base[k] for k in ("uri", "revision", "sha256")}
client.create_registered_model("m")
version = client.create_model_version("m", source="file:///nowhere", tags={
    "adapter_base_uri": base["uri"], "adapter_base_revision": str(base["revision"]),
    "adapter_base_sha256": base["sha256"]})
name, revision = registered_base(client.get_model_version("m", version.version), work)
out["registered_base"] = [name, revision]
out["registered_loads_pinned"] = torch.equal(weight(load_causal_lm(name, revision=revision)),
                                             weight(load_causal_lm(repo, revision=pinned)))
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hf-hub")
    root = cache / f"models--{REPO_ID.replace('/', '--')}"
    for commit, seed in ((PINNED, 0), (LATEST, 1)):
        build_tiny_chat_model("gemma3", root / "snapshots" / commit, seed=seed)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(LATEST)
    return cache


def test_a_pinned_hub_base_is_used_everywhere_and_its_stop_tokens_count(hub_cache, tmp_path):
    env = venv_env(HF_HUB_CACHE=str(hub_cache), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-c", CHECKS, REPO_ID, PINNED, str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    # Gemma 3's tokenizer EOS is <eos>; its generation_config adds <end_of_turn>, which ends every answer.
    assert out["stop_tokens"] == out["ref_stop_tokens"] == ["<end_of_turn>", "<eos>"], out
    assert out["pinned_differs_from_latest"], "the two hub commits must differ for this test to mean anything"
    assert out["ref_loads_pinned"], "a model_ref.json with a revision loaded another commit"
    assert out["fingerprint"] == f"hub:{REPO_ID}@{PINNED}"
    assert out["base"] == {"uri": f"hub:{REPO_ID}", "revision": PINNED, "sha256": f"hub:{REPO_ID}@{PINNED}"}
    assert out["registered_base"] == [REPO_ID, PINNED]
    assert out["registered_loads_pinned"], "the registry's base loaded the hub's latest, not the pinned commit"


def test_no_credentials_from_the_tracking_uri_reach_tags_or_logged_params():
    from pipeline.config import load_params
    from pipeline.tracking import public_params, redact

    secret = "hunter2"
    params = load_params(REPO_ROOT / "params.yaml")
    params = params.model_copy(update={"mlflow": params.mlflow.model_copy(
        update={"tracking_uri": f"https://alice:{secret}@mlflow.example:443/?token={secret}&team=ml"})})
    logged = json.dumps(public_params(params))
    assert secret not in logged and "alice:***@mlflow.example" in logged and "team=ml" in logged
    assert redact(f"postgresql://u:{secret}@db/mlflow") == "postgresql://u:***@db/mlflow"
    assert redact("sqlite:///mlflow/mlflow.db") == "sqlite:///mlflow/mlflow.db"
    # The register stage tags params_json and logs params.json from public_params only.
    source = (REPO_ROOT / "pipeline/stages/register.py").read_text()
    assert "model_dump(" not in source, "register.py logs params without redacting the tracking URI"
