"""A PostgreSQL of the team setup alone (flows/team.py: init, start, roles and databases), on a free port of
127.0.0.1, for tests of what sits on the database (the registry lock, the roles' credentials); stopped after."""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    from flows.team import Team

    # PostgreSQL runs as the `postgres` user when the tests run as root: it must be able to enter the directory.
    root = Path(tempfile.mkdtemp(prefix="pg-test-", dir="/tmp"))
    root.chmod(0o711)
    team = Team(root / "state", {"pg": free_port(), "mlflow": free_port(), "prefect": free_port()})
    team.root.mkdir()
    team.logs.mkdir()
    try:
        team.init_postgres()
        team.start_postgres()
        team.create_databases()
        yield team
    finally:
        team.down()
        shutil.rmtree(root, ignore_errors=True)
