"""The team's registry lock (a PostgreSQL advisory lock, pipeline/registry/lock.py) when its connection is lost.

A real PostgreSQL (flows/team.py, PostgreSQL only) on 127.0.0.1; the lock's session is killed from a superuser
session, as a dropped network or a restarted server would end it. The server then releases the lock, so the
holder must stop before moving any alias: `Held.check()` says so, and `decide` moves nothing.
"""

from __future__ import annotations

import pytest

from pipeline.config import load_params

pytestmark = pytest.mark.extended  # needs PostgreSQL and psycopg2 (`make install-team`)

NAME = "lock-loss-adapter"
METRICS = {"tuned_accuracy": 0.8, "base_accuracy": 0.2, "tuned_eos_rate": 1.0, "tuned_ppl_general": 100.0}


def kill_lock_session(team) -> int:
    """Terminate the lock holder's session, as a lost connection ends it; returns how many were ended."""
    conn = team.connect()
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s",
                        (f"pipeline registry:{NAME}",))
            return cur.fetchone()[0]
    finally:
        conn.close()


def test_a_lock_lost_while_held_stops_the_decision_before_any_alias_moves(postgres, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from pipeline.errors import DataError
    from pipeline.registry.gate import decide
    from pipeline.registry.lock import LOCK_URL_ENV, registry_lock

    urls = postgres.urls()
    monkeypatch.setenv(LOCK_URL_ENV, urls[LOCK_URL_ENV])
    monkeypatch.setenv("PGPASSFILE", urls["PGPASSFILE"])
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    client.create_registered_model(NAME)
    version = client.create_model_version(NAME, "s3://no-bucket/adapter", tags={"adapter_sha256": "ab"})
    with registry_lock("http://team", NAME) as held:
        held.check()  # held, connection alive
        assert kill_lock_session(postgres) == 1
        with pytest.raises(DataError, match="connection was lost while the lock was held"):
            held.check()
        with pytest.raises(DataError, match="stopping before moving any alias"):
            decide(load_params(), client, NAME, client.get_model_version(NAME, version.version), METRICS, {}, held)
    after = client.get_model_version(NAME, version.version)
    assert not after.aliases and "promotion" not in after.tags
    with registry_lock("http://team", NAME) as held:  # the server released it: the next registration goes on
        held.check()
        assert decide(load_params(), client, NAME, after, METRICS, {}, held)[1] == "champion"


def test_the_lock_connection_keeps_tcp_alive(postgres, monkeypatch):
    from pipeline.registry.lock import LOCK_URL_ENV, registry_lock

    urls = postgres.urls()
    monkeypatch.setenv(LOCK_URL_ENV, urls[LOCK_URL_ENV])
    monkeypatch.setenv("PGPASSFILE", urls["PGPASSFILE"])
    with registry_lock("http://team", NAME) as held:
        applied = held.connection  # what libpq applied to the lock's socket
    assert applied["keepalives"] == "1" and int(applied["keepalives_idle"]) <= 60, applied
