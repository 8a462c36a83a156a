"""The registry lock: one registration or rollback of a model at a time.

A PostgreSQL advisory lock when PIPELINE_REGISTRY_LOCK_URL is set (the team setup, flows/team.py), a lock
file beside the embedded sqlite store otherwise.
"""

from __future__ import annotations

import hashlib
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import DataError
from pipeline.tracking import redact

LOCK_URL_ENV = "PIPELINE_REGISTRY_LOCK_URL"
LOCK_TIMEOUT_S = 600


def registry_lock(uri: str, model_name: str):
    """A lock around a whole registration or rollback of `model_name`, so two cannot interleave.

    With PIPELINE_REGISTRY_LOCK_URL (a PostgreSQL URL, as `make team-up` prints) it is an advisory lock in
    that database, held by every process on every machine that registers against the shared server; for the
    embedded sqlite store a lock file beside it. Against a remote tracking server without a lock URL nothing
    serialises two registrations: a warning says so."""
    from contextlib import nullcontext

    from filelock import FileLock

    url = os.environ.get(LOCK_URL_ENV)
    if url:
        return advisory_lock(url, f"registry:{model_name}", LOCK_TIMEOUT_S)
    if uri.startswith("sqlite:///"):
        return FileLock(str(Path(uri.removeprefix("sqlite:///")).with_suffix(".registry.lock")), timeout=LOCK_TIMEOUT_S)
    print(f"warning: registry: no {LOCK_URL_ENV} is set, so registrations against {redact(uri)} are not "
          "serialised; a team sets it (`make team-up` prints it)", file=sys.stderr)
    return nullcontext()


def lock_key(name: str) -> int:
    """A signed 64-bit advisory-lock key for a name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


@contextmanager
def advisory_lock(url: str, name: str, timeout_s: float):
    """Hold PostgreSQL's session advisory lock for `name` on a connection of its own. The server releases it
    when the session ends, so a registration that dies mid-way never leaves it held. Passwords come from the
    URL or libpq's PGPASSFILE."""
    import psycopg2
    from psycopg2 import errors

    try:
        conn = psycopg2.connect(url, connect_timeout=10, application_name=f"pipeline {name}"[:63])
    except psycopg2.OperationalError as exc:
        raise DataError(f"{LOCK_URL_ENV}={redact(url)}: cannot connect to take the registry lock: "
                        f"{str(exc).strip()}") from None
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SET lock_timeout = %s", (f"{int(timeout_s * 1000)}ms",))
            try:
                cur.execute("SELECT pg_advisory_lock(%s)", (lock_key(name),))
            except errors.LockNotAvailable:
                raise DataError(f"registry lock {name!r}: still held by another registration after {timeout_s:.0f} s "
                                "(see pg_locks on the lock database)") from None
        yield
    finally:
        conn.close()
