"""One pipeline execution per checkout at a time.

Two executions against one checkout (a scheduled Prefect run and a manual `make run`) would interleave
their `dvc repro` stages and mix two runs' outputs. Both take this lock for their whole run: the
second waits (up to PIPELINE_LOCK_TIMEOUT seconds, default 6 h) and says whom it waits for, then fails
clearly. `python -m flows.lock <command...>` runs a command under the lock (`make run` does).
Each acquire and release is appended to `.dvc/tmp/pipeline-lock.log` (time, pid, what).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

LOCK_FILE = ".dvc/tmp/pipeline.lock"
HOLDER_FILE = ".dvc/tmp/pipeline.lock.holder"
EVENTS_FILE = ".dvc/tmp/pipeline-lock.log"
DEFAULT_TIMEOUT_S = 6 * 3600


class PipelineBusy(RuntimeError):
    """Another pipeline execution held the checkout's lock for longer than the timeout."""


def default_timeout() -> float:
    return float(os.environ.get("PIPELINE_LOCK_TIMEOUT", DEFAULT_TIMEOUT_S))


def _event(project: Path, event: str, what: str) -> None:
    with (project / EVENTS_FILE).open("a", encoding="utf-8") as f:
        f.write(json.dumps({"time": time.time(), "pid": os.getpid(), "event": event, "what": what}) + "\n")


@contextmanager
def pipeline_lock(project_dir: str | Path, what: str, timeout: float | None = None,
                  log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the checkout's pipeline lock; wait for another holder up to `timeout` seconds, then PipelineBusy."""
    project = Path(project_dir).resolve()
    (project / LOCK_FILE).parent.mkdir(parents=True, exist_ok=True)
    timeout = default_timeout() if timeout is None else timeout
    lock = FileLock(str(project / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = _holder(project)
        log(f"waiting for the pipeline lock of {project}: held by {holder} (up to {timeout:.0f} s)")
        _event(project, "wait", what)
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise PipelineBusy(f"another pipeline execution holds {project / LOCK_FILE} ({_holder(project)}); "
                               f"gave up after {timeout:.0f} s. Wait for it to finish, or raise "
                               "PIPELINE_LOCK_TIMEOUT") from None
    try:
        (project / HOLDER_FILE).write_text(f"pid {os.getpid()}, {what}, since {time.strftime('%Y-%m-%d %H:%M:%S')}",
                                           encoding="utf-8")
        _event(project, "acquired", what)
        yield
    finally:
        _event(project, "released", what)
        lock.release()


def _holder(project: Path) -> str:
    try:
        return (project / HOLDER_FILE).read_text(encoding="utf-8")
    except OSError:
        return "an unknown process"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m flows.lock <command> [args...]\n\n" + __doc__.strip())
        raise SystemExit(0 if argv else 2)
    try:
        with pipeline_lock(Path.cwd(), " ".join(argv), log=lambda m: print(m, file=sys.stderr, flush=True)):
            raise SystemExit(subprocess.call(argv))
    except PipelineBusy as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(75) from None  # EX_TEMPFAIL: try again later


if __name__ == "__main__":
    main()
