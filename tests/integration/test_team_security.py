"""The team's files and database roles let no one in (flows/team.py), on a real PostgreSQL run as its server user.

As root: no directory another local user can write into, the server user's log in a directory of its own,
every password file 0600 from creation, a log name planted as a symlink refused instead of followed, and a
client's credentials (the pgpass every worker and user gets) open the lock database and nothing else.
"""

from __future__ import annotations

import os
import stat

import pytest


pytestmark = pytest.mark.extended  # needs PostgreSQL and psycopg2 (`make install-team`)


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_no_directory_is_writable_by_others_and_secrets_are_owner_only(postgres):
    team = postgres
    for directory in [team.root, team.logs, team.secrets, team.pg_logs]:
        assert not mode(directory) & stat.S_IWOTH, (directory, oct(mode(directory)))
    assert mode(team.secrets) == 0o700 and mode(team.pg_logs) == 0o700
    for secret in [team.pgpass, *team.secrets.iterdir()]:
        assert mode(secret) == 0o600, (secret, oct(mode(secret)))
    if os.geteuid() == 0:  # PostgreSQL writes its log as its own user, in its own directory only
        import pwd

        assert pwd.getpwuid(os.stat(team.pg_logs).st_uid).pw_name == "postgres"
        assert (team.pg_logs / "postgres.log").is_file()
    assert not (team.root / "pg.pw").exists()  # the superuser's initdb password file is gone after initdb


def test_a_log_name_planted_as_a_symlink_is_refused_not_followed(postgres, tmp_path):
    from flows.team import open_log
    from pipeline.errors import DataError

    victim = tmp_path / "victim"
    victim.write_text("untouched\n", encoding="utf-8")
    link = postgres.logs / "mlflow.log"
    link.unlink(missing_ok=True)
    link.symlink_to(victim)
    try:
        with pytest.raises(DataError, match="not a symlink"):
            open_log(link)
    finally:
        link.unlink()
    assert victim.read_text(encoding="utf-8") == "untouched\n"


def test_a_clients_credentials_open_the_lock_database_and_nothing_else(postgres):
    import psycopg2

    from flows.team import LOCK_DB, LOCK_ROLE

    team = postgres
    roles = [line.split(":")[3] for line in team.pgpass.read_text(encoding="utf-8").splitlines()]
    assert roles == [LOCK_ROLE]  # the clients' file holds the lock role's password alone

    def connect(user: str, dbname: str):
        return psycopg2.connect(host="127.0.0.1", port=team.ports["pg"], user=user, dbname=dbname,
                                passfile=str(team.pgpass), connect_timeout=10)

    connect(LOCK_ROLE, LOCK_DB).close()  # what a registration needs
    for user, dbname in [("postgres", "postgres"), ("mlflow", "mlflow"), ("prefect", "prefect")]:
        with pytest.raises(psycopg2.OperationalError, match="password"):
            connect(user, dbname)  # no password for another role in the client's file
    with pytest.raises(psycopg2.OperationalError, match="permission denied for database"):
        psycopg2.connect(host="127.0.0.1", port=team.ports["pg"], user=LOCK_ROLE, dbname="mlflow",
                         password=team.password(LOCK_ROLE), connect_timeout=10)  # even with its password at hand
    # The servers' own files still open their databases.
    team.connect("mlflow", "mlflow").close()
    team.connect("prefect", "prefect").close()
