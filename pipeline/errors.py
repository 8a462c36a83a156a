"""Errors a user can cause and fix. Each message says what, where (file, record, key) and what to do.

`DataError` ends a command as one `error: ...` line with exit 2 (pipeline/cli.py); `ParamsError` does so
itself when params.yaml cannot be loaded.
"""

from __future__ import annotations

import sys


class ParamsError(SystemExit):
    """Exit with a message a user can act on (no traceback)."""

    def __init__(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        super().__init__(2)


class DataError(Exception):
    """Bad input a user can fix: the message names file, record and rule."""


class TemplateError(Exception):
    """The chat template cannot render or mask this chat."""


class PreflightError(DataError):
    """The configuration would not fit the memory budget (params `sft.max_memory_gb`)."""
