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


class Held:
    """What a held registry lock lets its holder ask: `check()` raises DataError when the lock may have been
    lost (the lock database's connection dropped, so the server released the advisory lock). Call it before
    every registry write made under the lock."""

    def __init__(self, check=None, connection: dict | None = None):
        self._check = check
        self.connection = connection or {}  # the lock database connection's parameters, as libpq applied them

    def check(self) -> None:
        if self._check is not None:
            self._check()


@contextmanager
def file_lock(path: Path, timeout_s: float):
    from filelock import FileLock

    with FileLock(str(path), timeout=timeout_s):
        yield Held()  # a local file lock is not lost while this process lives


@contextmanager
def unserialised():
    yield Held()


def registry_lock(uri: str, model_name: str):
    """A lock around the decision part of a registration or rollback of `model_name` (read the champion, decide,
    move aliases), so two cannot interleave; it yields a `Held` to check before each write.

    With PIPELINE_REGISTRY_LOCK_URL (a PostgreSQL URL, as `make team-up` prints) it is an advisory lock in
    that database, held by every process on every machine that registers against the shared server; for the
    embedded sqlite store a lock file beside it. Against a remote tracking server without a lock URL nothing
    serialises two registrations: a warning says so."""
    url = os.environ.get(LOCK_URL_ENV)
    if url:
        return advisory_lock(url, f"registry:{model_name}", LOCK_TIMEOUT_S)
    if uri.startswith("sqlite:///"):
        return file_lock(Path(uri.removeprefix("sqlite:///")).with_suffix(".registry.lock"), LOCK_TIMEOUT_S)
    print(f"warning: registry: no {LOCK_URL_ENV} is set, so registrations against {redact(uri)} are not "
          "serialised; a team sets it (`make team-up` prints it)", file=sys.stderr)
    return unserialised()


def lock_key(name: str) -> int:
    """A signed 64-bit advisory-lock key for a name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


# TCP keepalives on the lock's connection: a peer that vanished (network cut, server host down) is noticed in
# about a minute, instead of the holder believing it still holds a lock the server has long released.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}


@contextmanager
def advisory_lock(url: str, name: str, timeout_s: float):
    """Hold PostgreSQL's session advisory lock for `name` on a connection of its own. The server releases it
    when the session ends, so a registration that dies mid-way never leaves it held; by the same rule a
    connection lost while held means the lock is gone, which `Held.check()` reports before any alias moves.
    Passwords come from the URL or libpq's PGPASSFILE."""
    import psycopg2
    from psycopg2 import errors

    try:
        conn = psycopg2.connect(url, connect_timeout=10, application_name=f"pipeline {name}"[:63], **KEEPALIVES)
    except psycopg2.OperationalError as exc:
        raise DataError(f"{LOCK_URL_ENV}={redact(url)}: cannot connect to take the registry lock: "
                        f"{str(exc).strip()}") from None
    key = lock_key(name)

    def check() -> None:
        try:
            with conn.cursor() as cur:  # the session lives, so its session-level lock is still held
                cur.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() "
                            "AND granted AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = %s", (key,))
                held = cur.fetchone()[0] == 1
        except psycopg2.Error as exc:
            raise DataError(f"registry lock {name!r}: the lock database connection was lost while the lock was held "
                            f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}); "
                            "stopping before moving any alias. Run the stage again: a registered version is "
                            "adopted and its decision made then") from None
        if not held:
            raise DataError(f"registry lock {name!r}: no longer held; stopping before moving any alias")

    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SET lock_timeout = %s", (f"{int(timeout_s * 1000)}ms",))
            try:
                cur.execute("SELECT pg_advisory_lock(%s)", (key,))
            except errors.LockNotAvailable:
                raise DataError(f"registry lock {name!r}: still held by another registration after {timeout_s:.0f} s "
                                "(see pg_locks on the lock database)") from None
        yield Held(check, conn.get_dsn_parameters())
    finally:
        conn.close()
