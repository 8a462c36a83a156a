"""The team's MLflow and Prefect servers refuse whoever lacks the team's credentials (flows/team_auth.py), and the
clients that hold them work: the real servers on 127.0.0.1, started by flows/team.py on a real PostgreSQL.

Unauthenticated and wrongly authenticated requests get 401; MLflow's and Prefect's own clients, given the
credentials a worker gets (Team.client_env), create and read; the credentials file is owner-only.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import urllib.error
import urllib.request

import pytest


pytestmark = pytest.mark.extended  # needs PostgreSQL and psycopg2 (`make install-team`)


@pytest.fixture(scope="module")
def servers(postgres):
    team = postgres
    team.credentials.ensure()
    team.start_mlflow()
    team.start_prefect()  # creates the work pool and the concurrency limit: already an authenticated client
    yield team
    # postgres' own teardown (`down`) stops both servers: they are in team.json's processes


def status(url: str, auth: tuple[str, str] | None = None, data: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_mlflow_refuses_a_request_without_the_teams_credentials(servers):
    url = servers.urls()["MLFLOW_TRACKING_URI"]
    saved = servers.credentials.read()
    search = f"{url}/api/2.0/mlflow/registered-models/search"
    assert status(search) == 401
    assert status(search, ("team", "wrong-password")) == 401
    assert status(search, (saved["mlflow_username"], saved["mlflow_password"])) == 200
    assert status(f"{url}/health") == 200  # the health check stays open (the team's own start waits on it)


def test_prefect_refuses_a_request_without_the_auth_string(servers):
    api = servers.urls()["PREFECT_API_URL"]
    user, password = servers.credentials.read()["prefect_auth_string"].split(":", 1)
    assert status(f"{api}/work_pools/filter", data=b"{}") == 401
    assert status(f"{api}/work_pools/filter", (user, "wrong"), data=b"{}") == 401
    assert status(f"{api}/work_pools/filter", (user, password), data=b"{}") == 200


def test_clients_with_the_team_env_work_and_without_it_are_refused(servers, tmp_path):
    script = ("import json, mlflow\n"
              "from mlflow import MlflowClient\n"
              "from prefect.client.orchestration import get_client\n"
              "c = MlflowClient()\n"
              "c.create_registered_model('auth-probe')\n"
              "with get_client(sync_client=True) as p:\n"
              "    pools = [w.name for w in p.read_work_pools()]\n"
              "print(json.dumps({'models': [m.name for m in c.search_registered_models()], 'pools': pools}))\n")
    env = servers.client_env()
    ok = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                        timeout=180)
    assert ok.returncode == 0, ok.stderr[-3000:]
    seen = json.loads(ok.stdout.strip().splitlines()[-1])
    assert "auth-probe" in seen["models"] and "training" in seen["pools"], seen
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING"):
        refused = subprocess.run([sys.executable, "-c", script.replace("auth-probe", f"probe-without-{key}")],
                                 env={k: v for k, v in env.items() if k != key}, cwd=tmp_path, capture_output=True,
                                 text=True, timeout=180)
        assert refused.returncode != 0, (key, refused.stdout[-2000:])
        assert "401" in refused.stderr or "Unauthorized" in refused.stderr or "credentials" in refused.stderr, (
            key, refused.stderr[-2000:])


def test_the_credentials_are_owner_only_and_never_on_a_command_line(servers):
    for secret in (servers.credentials.file, servers.credentials.ini, servers.credentials.flask_key):
        assert stat.S_IMODE(os.lstat(secret).st_mode) == 0o600, secret
    saved = servers.credentials.read()
    for pid in servers.state["processes"].values():
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
        assert saved["mlflow_password"] not in cmdline and saved["prefect_auth_string"] not in cmdline
    for log in (p for p in servers.logs.rglob("*") if p.is_file()):
        text = log.read_text(encoding="utf-8", errors="replace")
        assert saved["mlflow_password"] not in text and saved["prefect_auth_string"] not in text, log
