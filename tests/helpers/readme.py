"""The commands README.md promises: parsed the way a user reads them, run the way a user types them."""

from __future__ import annotations

import os
import re

from tests.helpers.project import REPO_ROOT


def readme_commands() -> list[str]:
    """The dvc commands of the README's params section and every line of its "Using a registered adapter" block."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    dvc_commands = re.findall(r"`(\.venv/bin/dvc (?:exp run|exp show|metrics diff)[^`]*)`", text)
    section = text.split("## Using a registered adapter", 1)[1]
    block = section.split("```", 2)[1]
    adapter_commands = [line.split("  #")[0].strip() for line in block.strip().splitlines() if line.strip()]
    return dvc_commands + adapter_commands


def bare_env(uri: str) -> dict[str, str]:
    """A user's shell: no venv activated, nothing of the venv on PATH, no PIPELINE_PYTHON."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PIPELINE_PYTHON", "PIPELINE_RUN_KEY",
                                                             "PYTHONPATH")}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    env["MLFLOW_TRACKING_URI"] = uri
    return env
