"""Run the pipeline as a DVC experiment with a params profile: an overlay file of params.yaml keys.

    .venv/bin/python -m pipeline.commands.run_profile params-real.yaml [--name real-boolq] [--dry-run] [-S key=value]

Each leaf of the profile becomes one `-S key=value` of `dvc exp run` (in the override grammar DVC
parses: multi-line prompts survive quoted), so params.yaml stays the committed default and
the experiment records exactly what the profile changed (`dvc exp show`). `-S key=value` changes one more key
on top of the profile (the recipe of a profile on another imported set: its `data.*` paths). The overlay is
validated against the params schema before anything runs: a misspelt key stops here, naming it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.cli import cli_parser, run_cli
from pipeline.config import Params
from pipeline.errors import DataError


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """Dotted keys of every leaf."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out |= flatten(value, f"{name}.")
        else:
            out[name] = value
    return out


def override_value(value) -> str:
    """A value in the override grammar `dvc exp run -S` parses (Hydra's): strings single-quoted (any
    character, newlines included, with quotes and backslashes escaped), lists in brackets."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, list):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, dict) and not value:
        return "{}"
    raise DataError(f"profile value {value!r}: not a string, number, boolean, null or list")


def merged(base: dict, overlay: dict) -> dict:
    out = dict(base)
    for key, value in overlay.items():
        out[key] = merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def with_sets(overlay: dict, sets: list[str]) -> dict:
    """The overlay with `key=value` changes on top (the value read as YAML), e.g. data.train.path=... to carry
    a profile's recipe to another imported set."""
    out = merged({}, overlay)
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DataError(f"--set {item!r}: expected key=value, e.g. data.train.path=data/real/arc-easy/train.jsonl")
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node[part] = dict(node.get(part) or {})
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    return out


def overrides(profile: Path, params_file: Path = Path("params.yaml"), sets: list[str] | None = None) -> list[str]:
    if not profile.is_file():
        raise DataError(f"{profile}: profile not found")
    overlay = yaml.safe_load(profile.read_text(encoding="utf-8")) or {}
    if not isinstance(overlay, dict):
        raise DataError(f"{profile}: a profile is a mapping of params.yaml sections")
    overlay = with_sets(overlay, sets or [])
    base = yaml.safe_load(params_file.read_text(encoding="utf-8"))
    from pydantic import ValidationError

    try:
        Params.model_validate(merged(base, overlay))
    except ValidationError as e:
        first = e.errors()[0]
        raise DataError(f"{profile}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    return [f"{key}={override_value(value)}" for key, value in flatten(overlay).items()]


def main(argv: list[str] | None = None) -> None:
    parser = cli_parser(__doc__, "python -m pipeline.commands.run_profile")
    parser.add_argument("profile", type=Path, help="overlay of params.yaml keys, e.g. params-real.yaml")
    parser.add_argument("--name", help="experiment name (dvc exp run --name)")
    parser.add_argument("--dry-run", action="store_true", help="print the dvc command instead of running it")
    parser.add_argument("-S", "--set", dest="sets", action="append", default=[],
                        help="key=value on top of the profile (repeatable), e.g. data.eval.path=data/real/x/eval.jsonl")
    args = parser.parse_args(argv)
    sets = overrides(args.profile, sets=args.sets)
    dvc = str(Path(sys.executable).with_name("dvc"))
    cmd = [dvc, "exp", "run", *(["--name", args.name] if args.name else []), *(a for s in sets for a in ("-S", s))]
    if args.dry_run:
        print(" ".join(cmd))
        return
    env = {**os.environ, "PIPELINE_PYTHON": os.environ.get("PIPELINE_PYTHON", sys.executable)}
    raise SystemExit(subprocess.run(cmd, env=env).returncode)


if __name__ == "__main__":
    run_cli(main)
