"""Command-line entry points: `--help` from the module docstring, user errors as one line and exit 2.
"""

from __future__ import annotations

import sys


def cli_parser(doc: str | None, prog: str | None = None):
    """The argparse parser of a `python -m <module>` command: `--help` prints the module docstring (its
    summary line first). Parse with it before params or heavy libraries are loaded."""
    import argparse

    return argparse.ArgumentParser(prog=prog, description=(doc or "").strip(),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def run_cli(main) -> None:
    """Run a CLI's main(); an error the user can fix (pipeline.errors.DataError) ends as one line, exit 2.

    A stage takes no arguments: run as `python -m pipeline.<stage>`, `--help` prints what it does (its
    module docstring) and exits before any params or heavy library are loaded, and an unknown argument
    is refused (exit 2) instead of ignored. Called in-process (tests: `run_cli(validate.main)`), the
    command line is not the stage's and is left alone. A tool's main(argv) parses its own options."""
    import inspect

    from pipeline.errors import DataError

    if main.__module__ == "__main__" and not inspect.signature(main).parameters:
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        parser = cli_parser(sys.modules["__main__"].__doc__, f"python -m {spec.name}" if spec else None)
        parser.epilog = "Reads params.yaml in the current directory (the project root)."
        parser.parse_args()
    try:
        main()
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
