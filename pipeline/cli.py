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
    except Exception as exc:
        if not tracking_unreachable(exc):
            raise
        import os

        print(f"error: the MLflow tracking server {os.environ.get('MLFLOW_TRACKING_URI', '')} does not answer (MLflow "
              f"retried the request: {str(exc).splitlines()[0][:300]}); stopped here. Run it again once the server "
              "answers (make team-up, make ui): a version already registered for the same adapter is adopted, "
              "not made twice", file=sys.stderr)
        raise SystemExit(2) from None


def tracking_unreachable(exc: BaseException) -> bool:
    """Whether exc is MLflow's client giving up on a tracking server it cannot connect to (after its own retries)."""
    exceptions = sys.modules.get("mlflow.exceptions")
    if exceptions is None or not isinstance(exc, exceptions.MlflowException):
        return False
    text = str(exc)
    return "API request to" in text and ("Failed to establish a new connection" in text or "Connection refused" in text
                                         or "Max retries exceeded" in text)
