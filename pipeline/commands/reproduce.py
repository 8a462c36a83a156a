"""Re-create a registered adapter: `python -m pipeline.commands.reproduce --model-uri models:/<name>/<version>`.

Refuses a version trained from uncommitted changes (`git_dirty` tag). Checks out the version's git
commit in a separate worktree (the current checkout is not touched), shares this repository's DVC
cache so the data versions that commit names are restored from it (`dvc checkout`; it stops when the
cache lacks one: `dvc pull` first), checks that the commit's params hash to the version's
`params_hash` tag, and re-runs the pipeline there with a tracking store of its own (so the
reproduction adds no version to the registry). Then one of two checks, by machine class (CPU ISA
level, torch build, CUDA/GPU: pipeline/registry/machine.py):
- same class as the version's `machine_class` tag: `dvc repro sft`, and the sha256 of the re-created
  `adapter_model.safetensors` must equal the registered one (`"check": "bytes"`);
- another class (or no tag): kernels differ, so bytes cannot match; `dvc repro evaluate`, and the gate
  metric must be within `--tolerance` (relative, default 0.05) of the registered value
  (`"check": "metrics"`).
Exit 0 when the check passes, 1 when not.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.artifacts import file_sha256
from pipeline.cli import cli_parser, run_cli
from pipeline.config import load_params, params_hash
from pipeline.env import interpreter_env
from pipeline.errors import DataError
from pipeline.modeling.precision import PIN_ENV
from pipeline.registry.machine import machine_tags
from pipeline.tracking import configure


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DataError(f"`{' '.join(cmd)}` failed in {cwd} (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-2000:]}")


def reproduce(model_uri: str, workdir: Path, tolerance: float = 0.05) -> dict:
    import mlflow
    from pipeline.registry.read import model_version

    client = mlflow.MlflowClient()
    try:
        version = model_version(client, model_uri)
    except mlflow.exceptions.MlflowException as exc:
        raise DataError(f"{model_uri}: not in the registry ({exc.message})") from None
    commit = version.tags.get("git_commit", "")
    if not commit or commit == "unknown":
        raise DataError(f"{model_uri}: the version records no git commit; it cannot be reproduced")
    if version.tags.get("git_dirty") == "True":
        raise DataError(f"{model_uri}: trained from uncommitted changes (git_dirty) on top of {commit[:12]}; that "
                        "commit does not describe it, so it cannot be reproduced (commit, then train and register)")
    registered = Path(mlflow.artifacts.download_artifacts(f"models:/{version.name}/{version.version}")) / "peft"
    expected = file_sha256(registered / "adapter_model.safetensors")

    repo = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                               check=True).stdout.strip())
    if workdir.exists():
        raise DataError(f"{workdir}: already exists; pass another --workdir or remove it")
    run(["git", "worktree", "add", "--detach", str(workdir), commit], repo)
    try:
        params = load_params(workdir / "params.yaml")
        if params_hash(params) != version.tags.get("params_hash"):
            raise DataError(f"{model_uri}: params.yaml at commit {commit[:12]} hashes to {params_hash(params)}, the "
                            f"version was trained with {version.tags.get('params_hash')} (uncommitted params?)")
        # `auto` precision is re-used as registered, never re-decided (pipeline/modeling/precision.py)
        pin = {PIN_ENV: f"{version.tags['sft.compute_dtype']}/{version.tags['sft.quantization']}"} \
            if "auto" in (params.sft.compute_dtype, params.sft.quantization) and "sft.compute_dtype" in version.tags else {}
        env = interpreter_env(MLFLOW_TRACKING_URI=f"sqlite:///{workdir / 'reproduce-mlflow.db'}",
                              PIPELINE_RUN_KEY=f"reproduce-{version.name}-{version.version}", **pin)
        dvc = [sys.executable, "-m", "dvc"]
        run([*dvc, "cache", "dir", "--local", str(repo / ".dvc" / "cache")], workdir, env)
        if (workdir / "dvc.lock").is_file():
            checkout = subprocess.run([*dvc, "checkout"], cwd=workdir, env=env, capture_output=True, text=True)
            if checkout.returncode != 0:
                raise DataError(f"{model_uri}: `dvc checkout` of commit {commit[:12]} failed: the DVC cache lacks data "
                                f"that commit names; run `dvc pull` (or restore the cache) first:\n"
                                f"{(checkout.stdout + checkout.stderr)[-1500:]}")
        here, there = machine_tags()["machine_class"], version.tags.get("machine_class")
        result = {"model": f"models:/{version.name}/{version.version}", "commit": commit, "workdir": str(workdir),
                  "machine_class": here, "registered_machine_class": there}
        if here == there:
            run([*dvc, "repro", "sft"], workdir, env)
            got = file_sha256(workdir / params.sft.out_dir / "adapter_model.safetensors")
            result |= {"check": "bytes", "registered_sha256": expected, "reproduced_sha256": got,
                       "identical": got == expected}
        else:
            gate = params.registry.gate_metric
            if f"metric.{gate}" not in version.tags:  # checked before minutes of training, not after
                raise DataError(f"{model_uri}: registered on machine class {there or '(untagged)'}, not this one "
                                f"({here}), and it has no metric.{gate} tag to compare a re-run with")
            old = float(version.tags[f"metric.{gate}"])
            run([*dvc, "repro", "evaluate"], workdir, env)
            new = json.loads((workdir / "metrics/eval.json").read_text(encoding="utf-8"))[gate]
            result |= {"check": "metrics", "metric": gate, "registered": old, "reproduced": new,
                       "tolerance": tolerance, "identical": abs(new - old) <= tolerance * abs(old)}
    except BaseException:
        subprocess.run(["git", "worktree", "remove", "--force", str(workdir)], cwd=repo, capture_output=True)
        raise
    return result


def main(argv: list[str] | None = None) -> None:
    parser = cli_parser(__doc__, "python -m pipeline.commands.reproduce")
    parser.add_argument("--model-uri", required=True, help="models:/<name>/<version> or models:/<name>@<alias>")
    parser.add_argument("--workdir", default=None, help="where the worktree goes (default: .reproduce/<name>-<version>)")
    parser.add_argument("--keep", action="store_true", help="keep the worktree after a successful comparison")
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="across machine classes: largest relative difference of the gate metric (default 0.05)")
    args = parser.parse_args(argv)
    if args.tolerance < 0:  # |new - old| <= negative: every metrics check would fail
        parser.error(f"--tolerance {args.tolerance}: must be >= 0 (a relative difference, 0.05 = 5%)")
    configure(load_params())
    workdir = Path(args.workdir or Path(".reproduce") / args.model_uri.removeprefix("models:/").replace("/", "-")
                   .replace("@", "-")).resolve()
    result = reproduce(args.model_uri, workdir, args.tolerance)
    if not args.keep:
        subprocess.run(["git", "worktree", "remove", "--force", str(workdir)], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result, indent=2))
    what = ("identical adapter bytes (same machine class)" if result["check"] == "bytes" else
            f"{result['metric']} {result['reproduced']:.4f} vs registered {result['registered']:.4f}, within "
            f"{result['tolerance']:.0%} (machine class {result['machine_class']} vs {result['registered_machine_class']})")
    if not result["identical"]:
        print(f"reproduce: {result['model']}: NOT reproduced ({result['check']} check failed): {what}", file=sys.stderr)
        raise SystemExit(1)
    print(f"reproduce: {result['model']} re-created from commit {result['commit'][:12]}: {what}", file=sys.stderr)

if __name__ == "__main__":
    run_cli(main)
