"""Authentication on the team's MLflow and Prefect servers, with generated credentials kept like the database
passwords (flows/team.py): nobody who merely reaches a port can read runs, register a version or trigger a run.

- Prefect: the server answers only requests carrying its API auth string (PREFECT_SERVER_API_AUTH_STRING,
  "team:<token>"; its health check stays open); clients send it as PREFECT_API_AUTH_STRING.
- MLflow: the server runs MLflow's basic-auth app (`mlflow server --app-name basic-auth`) configured by an ini
  in secrets/: the team account as its admin, its user store next to it, no permission for any other account
  by default; clients send MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD. Further per-person accounts
  can be added with MLflow's user API as that admin.

Files: `credentials.json` (0600, the owner's: what every client and worker sends) and, in `secrets/` (0700), the
auth app's ini, its user store and the Flask secret key the app needs for its CSRF protection. Nothing of it
goes into a URL, a command line, a tag or a log.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from pipeline.errors import DataError

ACCOUNT = "team"


def write_secret(path: Path, text: str) -> None:
    """Create `path` readable by its owner only, with mode 0600 from its first byte (not created under the umask
    and chmod'ed after), never through a symlink planted where it goes."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


class Credentials:
    def __init__(self, root: Path, secrets_dir: Path):
        self.file = root / "credentials.json"
        self.ini = secrets_dir / "mlflow-auth.ini"
        self.flask_key = secrets_dir / "mlflow-flask-key"
        self.user_store = secrets_dir / "mlflow-auth.db"

    def ensure(self) -> None:
        """Generate what is missing (a first `up`, or a team dir made before the servers had authentication)."""
        if not self.file.is_file():
            write_secret(self.file, json.dumps({"prefect_auth_string": f"{ACCOUNT}:{secrets.token_urlsafe(24)}",
                                                "mlflow_username": ACCOUNT,
                                                "mlflow_password": secrets.token_urlsafe(24)}, indent=2) + "\n")
            self.user_store.unlink(missing_ok=True)  # its admin would keep the old password
        if not self.flask_key.is_file():
            write_secret(self.flask_key, secrets.token_urlsafe(32) + "\n")
        if not self.ini.is_file():
            saved = self.read()
            write_secret(self.ini, "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                         f"database_uri = sqlite:///{self.user_store}\n"
                         f"admin_username = {saved['mlflow_username']}\nadmin_password = {saved['mlflow_password']}\n"
                         "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")

    def read(self) -> dict[str, str]:
        try:
            return json.loads(self.file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"{self.file}: the team's client credentials cannot be read ({exc}); "
                            "`python -m flows.team up` writes them") from None

    def client_env(self) -> dict[str, str]:
        """What a client (worker, user's shell, test) sends; empty before the first `up` wrote the file."""
        if not self.file.is_file():
            return {}
        saved = self.read()
        return {"PREFECT_API_AUTH_STRING": saved["prefect_auth_string"],
                "MLFLOW_TRACKING_USERNAME": saved["mlflow_username"],
                "MLFLOW_TRACKING_PASSWORD": saved["mlflow_password"]}

    def mlflow_server_env(self) -> dict[str, str]:
        return {"MLFLOW_AUTH_CONFIG_PATH": str(self.ini),
                "MLFLOW_FLASK_SERVER_SECRET_KEY": self.flask_key.read_text(encoding="utf-8").strip()}

    def prefect_server_env(self) -> dict[str, str]:
        return {"PREFECT_SERVER_API_AUTH_STRING": self.read()["prefect_auth_string"]}
