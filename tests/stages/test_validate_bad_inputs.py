"""Bad input: every case under tests/bad_inputs/ is refused with a message naming file, record, field and rule.

Each case directory holds its bad file(s) and a `case.yaml` (see tests/bad_inputs/README.md). A case is
applied to a good project by copying the directory to `bad/` inside it and editing params.yaml: datasets
named in `replace` point at `bad/<file>` (with `format` if given), `params` is deep-merged, and `generate`
makes files too big or too binary to commit. Then:

a. the real validate entry point (`run_cli(pipeline.stages.validate.main)`, in-process for speed) must exit with
   the case's code, print every `expect` substring on stderr, print no traceback, leave data/processed
   byte-identical and register nothing;
b. `dvc repro` of the whole pipeline (after one good tiny run) must fail with the same messages and leave
   the adapter, the MLflow registry (versions and aliases) and reports/registry.json untouched.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import yaml

from tests.helpers.project import REPO_ROOT, dvc, git, make_project_copy

CASES_DIR = Path(__file__).resolve().parents[1] / "bad_inputs"
CASES = sorted(p.name for p in CASES_DIR.iterdir() if (p / "case.yaml").is_file())
CASE_KEYS = {"description", "replace", "format", "params", "exit", "expect", "expect_dvc", "generate"}

# Small enough that a good validate run takes seconds and a full `dvc repro` well under a minute.
TINY = {"hidden_size": 64, "num_layers": 1, "num_heads": 2, "intermediate_size": 128, "vocab_size": 600,
        "max_position_embeddings": 256}
SAMPLE = {"n_train": 40, "n_eval": 12, "n_validation": 10, "n_domain_lines": 50, "n_heldout_lines": 10}
TWO_GIB = 2 * 1024**3
# Part b runs every case that stops before the heavy imports (exit 2: a few seconds each) and these failed-
# expectation cases (exit 1: ~20 s each); BAD_INPUTS_DVC=all runs every case through dvc (~7 more minutes).
DVC_RULE_CASES = ("33-template-masks-everything",)  # params-only: dvc must rerun validate for `task`


# ----------------------------------------------------------------------------- cases


def load_case(name: str) -> dict:
    spec = yaml.safe_load((CASES_DIR / name / "case.yaml").read_text(encoding="utf-8"))
    assert set(spec) <= CASE_KEYS and {"description", "exit", "expect"} <= set(spec), f"{name}: bad case.yaml keys"
    assert spec["exit"] in (1, 2) and spec["expect"], name
    return spec


def _png(target: Path) -> None:
    """A real 1x1 PNG image (signature, IHDR, IDAT, IEND)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    target.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
                       + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))


def _random_bytes(target: Path) -> None:
    target.write_bytes(random.Random(0).randbytes(4096))


def _two_gb_line(target: Path) -> None:
    """One short JSONL document, then a 2 GiB one: a sparse file, so it costs no disk (the hole reads as NULs)."""
    with target.open("wb") as f:
        f.write('{"text": "짧은 첫 문서."}\n'.encode())
        f.write(b'{"text": "')
        f.seek(f.tell() + TWO_GIB)
        f.write(b'"}\n')


def _parquet(target: Path) -> None:
    """The case's rows.jsonl as a Parquet file."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (target.parent / "rows.jsonl").read_text(encoding="utf-8").splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), target)


def _truncated_parquet(target: Path) -> None:
    _parquet(target)
    os.truncate(target, target.stat().st_size // 2)


GENERATORS = {"png": _png, "random_bytes": _random_bytes, "two_gb_line": _two_gb_line, "parquet": _parquet,
              "truncated_parquet": _truncated_parquet}


def deep_merge(dst: dict, src: dict) -> dict:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            deep_merge(dst[key], value)
        else:
            dst[key] = value
    return dst


def apply_case(project: Path, name: str) -> dict:
    """Copy the case to project/bad/ and point params.yaml at it; return the case spec."""
    spec = load_case(name)
    bad = project / "bad"
    shutil.copytree(CASES_DIR / name, bad, ignore=shutil.ignore_patterns("case.yaml"))
    replace = spec.get("replace") or {}
    if spec.get("generate"):
        assert len(replace) == 1, f"{name}: `generate` writes the one file named in `replace`"
        GENERATORS[spec["generate"]](bad / next(iter(replace.values())))
    params_file = project / "params.yaml"
    params = yaml.safe_load(params_file.read_text(encoding="utf-8"))
    for dataset, rel in replace.items():
        params["data"][dataset]["path"] = f"bad/{rel}"
    for dataset, fmt in (spec.get("format") or {}).items():
        params["data"][dataset]["format"] = fmt
    deep_merge(params, spec.get("params") or {})
    params_file.write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return spec


def remove_generated(project: Path) -> None:
    """Drop the case's files (the 2 GiB sparse file must not linger in pytest's kept temp dirs)."""
    shutil.rmtree(project / "bad", ignore_errors=True)


def check_message(spec: dict, output: str) -> None:
    missing = [s for s in spec["expect"] if s not in output]
    assert not missing, f"expected in the output: {missing}\n--- output ---\n{output[-4000:]}"
    assert "Traceback" not in output, output[-4000:]


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def registry_state(uri: str) -> dict[str, dict]:
    """Registered model -> {versions (with run id), aliases}: everything a bad input must leave alone."""
    from mlflow import MlflowClient

    client = MlflowClient(uri, registry_uri=uri)
    state = {}
    for model in client.search_registered_models():
        versions = client.search_model_versions(f"name = '{model.name}'")
        state[model.name] = {"versions": sorted((int(v.version), v.run_id) for v in versions),
                             "aliases": dict(model.aliases)}
    return state


def tiny_params(project: Path, uri: str | None = None) -> dict:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["sample_data"].update(SAMPLE)
    params["base"]["tiny"].update(TINY)
    params["dapt"].update(max_steps=10, batch_size=4)
    params["sft"].update(max_steps=6, batch_size=4, logging_steps=2)
    params["evaluate"].update(max_eval_items=8, batch_size=8)
    if uri:
        params["mlflow"].update(tracking_uri=uri, artifact_root=str(project.parent / "artifacts"))
    return params


def test_the_case_directory_covers_the_requirement():
    assert len(CASES) >= 20
    specs = {name: load_case(name) for name in CASES}
    assert len({yaml.safe_dump(s) for s in specs.values()}) == len(specs)  # distinct cases
    for name, spec in specs.items():
        files = {p.name for p in (CASES_DIR / name).iterdir()} - {"case.yaml"}
        assert files or spec.get("generate") or spec.get("params") or spec.get("replace"), name
        assert spec.get("generate") in (None, *GENERATORS), name
        # the message names the file: a case file, the good data or params.yaml
        assert any(f in e for e in spec["expect"] for f in ("bad/", "data/sample/", "params.yaml")), name


# ----------------------------------------------------------------------------- a. validate entry point


@pytest.fixture(scope="module")
def good_project(tmp_path_factory):
    """A small good project (generated data, tiny base, params) and one successful validate run in it."""
    from mlflow.tracking._tracking_service import utils as tracking_utils

    import mlflow
    from pipeline.cli import run_cli
    from pipeline.config import SampleDataParams, TinyModelParams, load_params
    from pipeline.data.formats import to_example
    from pipeline.data.readers import read_records
    from pipeline.data.synthetic import generate
    from pipeline.modeling.tiny import build_tiny_base
    from pipeline.stages.validate import main

    root = tmp_path_factory.mktemp("bad_inputs_validate")
    project = root / "project"
    uri = f"sqlite:///{root / 'mlflow.db'}"
    params = tiny_params(project, uri)
    sample = SampleDataParams(**params["sample_data"])
    generate(sample, sample.num_choices, params["seed"], project / sample.out_dir)
    (project / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")
    loaded = load_params(project / "params.yaml")
    texts = ["\n".join(m["content"] for m in to_example(r, "mcq", loaded.task).messages)
             for r in read_records(project / sample.out_dir / "train.jsonl")]
    texts += [r.value["text"] for r in read_records(project / sample.out_dir / "domain_train.txt")]
    build_tiny_base(texts, TinyModelParams(**TINY), loaded.seed, project / loaded.base.out_dir)

    saved_uri = tracking_utils._tracking_uri
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # the params' store; mlflow sets the variable itself
        mp.chdir(project)
        run_cli(main)
        processed = tree_digest(project / "data/processed")
        assert set(processed) >= {"train.jsonl", "eval.jsonl", "manifest.json"}
        yield {"project": project, "uri": uri, "processed": processed}
        mlflow.set_tracking_uri(saved_uri)  # don't leak this store to other test modules


@pytest.mark.parametrize("name", CASES)
def test_validate_entry_point_rejects(name, good_project, tmp_path, monkeypatch, capfd):
    from pipeline.cli import run_cli
    from pipeline.stages.validate import main

    project = tmp_path / "project"
    shutil.copytree(good_project["project"], project, symlinks=True)
    spec = apply_case(project, name)
    monkeypatch.chdir(project)
    capfd.readouterr()
    try:
        with pytest.raises(SystemExit) as exited:
            run_cli(main)
    finally:
        remove_generated(project)
    _, err = capfd.readouterr()  # fd-level: also what libraries write; the real stderr escapes lone surrogates
    assert exited.value.code == spec["exit"], f"exit {exited.value.code}, expected {spec['exit']}\n{err[-3000:]}"
    check_message(spec, err)
    assert tree_digest(project / "data/processed") == good_project["processed"]  # untouched
    assert not (project / "models/adapter").exists() and not (project / "models/dapt").exists()
    assert registry_state(good_project["uri"]) == {}


# ----------------------------------------------------------------------------- b. dvc repro


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory):
    """A git + DVC project copy with tiny params, after one complete good `dvc repro` (own MLflow store)."""
    root = tmp_path_factory.mktemp("bad_inputs_dvc")
    project = make_project_copy(root / "project")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    (project / "params.yaml").write_text(yaml.safe_dump(tiny_params(project), allow_unicode=True, sort_keys=False),
                                         encoding="utf-8")
    git(project, "commit", "-q", "-am", "tiny params")
    dvc(project, "repro", MLFLOW_TRACKING_URI=uri)
    state = {"project": project, "uri": uri, "registry": registry_state(uri),
             "adapter": sha256(project / "models/adapter/adapter_model.safetensors"),
             "registry_json": (project / "reports/registry.json").read_bytes(),
             "processed": tree_digest(project / "data/processed")}
    assert state["registry"], "the good run registered no model version"
    return state


@pytest.mark.extended
@pytest.mark.parametrize("name", CASES)
def test_dvc_repro_rejects(name, request):
    spec = load_case(name)
    if spec["exit"] == 1 and name not in DVC_RULE_CASES and os.environ.get("BAD_INPUTS_DVC") != "all":
        pytest.skip("a failed expectation costs ~20 s through dvc (a fresh validate process importing GX, torch and "
                    "mlflow); part a checks its message, DVC_RULE_CASES the dvc path; BAD_INPUTS_DVC=all runs it")
    dvc_project = request.getfixturevalue("dvc_project")  # after the skip: no full run for skipped cases only
    project, uri = dvc_project["project"], dvc_project["uri"]
    try:
        apply_case(project, name)
        proc = dvc(project, "repro", check=False, MLFLOW_TRACKING_URI=uri)
    finally:
        remove_generated(project)
        git(project, "checkout", "params.yaml")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    check_message({**spec, "expect": spec.get("expect_dvc") or spec["expect"]}, output)
    assert "Running stage 'dapt'" not in output and "Running stage 'sft'" not in output  # nothing trained
    assert sha256(project / "models/adapter/adapter_model.safetensors") == dvc_project["adapter"]
    assert registry_state(uri) == dvc_project["registry"]
    assert (project / "reports/registry.json").read_bytes() == dvc_project["registry_json"]
    assert tree_digest(project / "data/processed") == dvc_project["processed"]  # persist: the last good data stays


@pytest.mark.extended
def test_reproduce_recreates_the_registered_adapter(dvc_project, tmp_path):
    """The README's `pipeline.commands.reproduce` command re-creates version 1 from its commit in a worktree: on this
    machine class the same adapter bytes; registered on another class, the gate metric within tolerance;
    a version trained from uncommitted changes is refused."""
    import json
    import subprocess
    import sys

    from mlflow import MlflowClient
    from tests.helpers.project import venv_env
    from tests.helpers.readme import readme_commands

    command = next(c for c in readme_commands() if "pipeline.commands.reproduce" in c).split()
    assert command[:3] == [".venv/bin/python", "-m", "pipeline.commands.reproduce"], command
    project = dvc_project["project"]

    def reproduce(workdir: str) -> tuple[subprocess.CompletedProcess, dict | None]:
        proc = subprocess.run([sys.executable, *command[1:], "--workdir", str(tmp_path / workdir)], cwd=project,
                              capture_output=True, text=True, env=venv_env(MLFLOW_TRACKING_URI=dvc_project["uri"]),
                              timeout=900)
        out = proc.stdout
        return proc, (json.loads(out[out.index("{"):out.rindex("}") + 1]) if "{" in out else None)

    proc, result = reproduce("repro")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert result["check"] == "bytes" and result["machine_class"] == result["registered_machine_class"]
    assert result["identical"] and result["reproduced_sha256"] == result["registered_sha256"]
    assert "identical adapter bytes" in proc.stderr
    assert registry_state(dvc_project["uri"]) == dvc_project["registry"]  # no new version
    assert not (tmp_path / "repro").exists()  # the worktree is removed

    client = MlflowClient(dvc_project["uri"])
    version = client.get_model_version("mcq-reading-adapter", "1")
    try:  # as if registered on another machine class: bytes cannot be promised, metrics are compared
        client.set_model_version_tag("mcq-reading-adapter", "1", "machine_class", "x86_64/AVX512/other-build")
        proc, result = reproduce("repro-metrics")
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        assert result["check"] == "metrics" and result["metric"] == "tuned_accuracy"
        assert abs(result["reproduced"] - result["registered"]) <= 0.05 * result["registered"]
        client.set_model_version_tag("mcq-reading-adapter", "1", "git_dirty", "True")
        proc, result = reproduce("repro-dirty")
        assert proc.returncode == 2 and "uncommitted changes" in proc.stderr and result is None
        assert not (tmp_path / "repro-dirty").exists()
    finally:
        for key in ("machine_class", "git_dirty"):
            client.set_model_version_tag("mcq-reading-adapter", "1", key, version.tags[key])
