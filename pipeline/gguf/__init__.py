"""GGUF export: llama.cpp's converter (convert.py), llama.cpp itself for verification (runtime.py), Ollama's
Modelfile (ollama.py). The tools live outside site-packages, in the venv's `export-tools/` (Makefile
`install-export`, pinned by sha256 in requirements-export.txt): the converter bundles its own `gguf` module,
which would shadow the pinned `gguf` that transformers reads GGUF files with, so it only ever runs in a
subprocess with its own directory first on the path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

TOOLS_ENV = "PIPELINE_EXPORT_TOOLS"


def tools_dir() -> Path:
    """Where `make install-export` put the converter (convert/) and llama.cpp (llama/)."""
    return Path(os.environ.get(TOOLS_ENV) or Path(sys.prefix) / "export-tools")


def missing_tools_message(what: Path) -> str:
    return (f"{what}: the GGUF export tools are not installed; run `make install-export` (it installs the pinned "
            f"llama.cpp converter and runtime into {tools_dir()}), or set {TOOLS_ENV} to where they are")
