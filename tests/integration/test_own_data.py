"""Bringing your own dataset: `dvc add` + a params change, and a round trip through a local DVC remote."""

from __future__ import annotations

import hashlib
import shutil

import yaml

from pipeline.config import load_params
from pipeline.data.synthetic import generate
from tests.helpers.project import dvc, git


def test_own_dataset_is_versioned_pushed_pulled_and_validated(project_copy, tmp_path):
    project = project_copy
    # A user's dataset: here made by the generator with another seed, saved where the user keeps data.
    params = load_params(project / "params.yaml")
    generate(params.sample_data.model_copy(update={"n_train": 80, "n_eval": 20}), params.sample_data.num_choices, 7,
             tmp_path / "own")
    own = project / "data/own/train.jsonl"
    own.parent.mkdir(parents=True)
    shutil.copy(tmp_path / "own/train.jsonl", own)
    md5 = hashlib.md5(own.read_bytes()).hexdigest()

    # 1. version it with DVC and point params at it
    dvc(project, "add", "data/own/train.jsonl")
    raw = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    raw["data"]["train"] = {"path": "data/own/train.jsonl", "format": "mcq"}
    (project / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False), encoding="utf-8")
    assert yaml.safe_load((project / "data/own/train.jsonl.dvc").read_text())["outs"][0]["md5"] == md5

    # 2. round trip through a local remote: push, lose the file and the cache, pull it back
    remote = tmp_path / "remote"
    dvc(project, "remote", "add", "-d", "local", str(remote))
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "own training data")
    dvc(project, "push", "data/own/train.jsonl.dvc")
    assert any(p.is_file() for p in remote.rglob("*"))
    own.unlink()
    shutil.rmtree(project / ".dvc/cache")
    dvc(project, "pull", "data/own/train.jsonl.dvc")
    assert hashlib.md5(own.read_bytes()).hexdigest() == md5

    # 3. the pipeline now validates (and would train on) the user's data
    proc = dvc(project, "repro", "validate")
    assert "Running stage 'validate'" in proc.stdout
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    deps = {d["path"]: d["md5"] for d in lock["stages"]["validate"]["deps"]}
    assert deps["data/own/train.jsonl"] == md5
