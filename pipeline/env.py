"""Process environment the stages need before heavy libraries are imported.

HF_HUB_OFFLINE=1 when the base model is the built-in default or a local directory: transformers,
bitsandbytes and MLflow otherwise retry the hub for about a minute on a machine without it.
A hub id as base leaves the hub reachable. An explicit value in the environment always wins.

`interpreter_env` is the environment for a `dvc` (or `python`) subprocess: this interpreter's directory
first on PATH, so DVC and the stages it runs use the same venv as the caller.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path

import yaml


def base_model_is_local(params_file: Path = Path("params.yaml")) -> bool:
    try:
        model = (yaml.safe_load(params_file.read_text(encoding="utf-8")) or {}).get("base", {}).get("model")
    except (OSError, yaml.YAMLError, AttributeError):
        return True  # params are validated (with a proper message) later; stay offline until then
    return not isinstance(model, str) or model == "builtin-tiny" or Path(model).exists()


def configure_environment(environ: MutableMapping[str, str]) -> None:
    environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    environ.setdefault("DO_NOT_TRACK", "1")
    if base_model_is_local():
        environ.setdefault("HF_HUB_OFFLINE", "1")
        environ.setdefault("HF_DATASETS_OFFLINE", "1")
        environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def interpreter_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """`base` (default: this process's environment) plus `extra`, with this interpreter's bin dir first on PATH."""
    env = dict(os.environ if base is None else base) | extra
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env
