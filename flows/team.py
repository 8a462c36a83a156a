"""The team setup on one host: PostgreSQL, an MLflow server and a Prefect server on it, process workers.

    .venv/bin/python -m flows.team up [--workers 2]   # `make team-up`
    .venv/bin/python -m flows.team env                # the exports a client needs (eval "$(...)")
    .venv/bin/python -m flows.team status
    .venv/bin/python -m flows.team down               # `make team-down`: everything stops

Everything binds 127.0.0.1. State lives in TEAM_DIR (default `.team/`, not committed): `pg/` the database
cluster, `artifacts/` the MLflow artifact store (proxied by the MLflow server: clients need no access to
it), `logs/` (the server user's own `logs/postgres/`), `team.json` (ports and process ids), `pgpass` (mode
0600: the clients' file, with the `registry_lock` role's password only) and `secrets/` (mode 0700: one pgpass per
server role, the superuser's included). Passwords never appear in a URL, a command line, a tag or a log: libpq
(MLflow, the registry lock) and asyncpg (Prefect) read them from a pgpass file through PGPASSFILE.

Databases: `mlflow` (MLflow's tracking and registry store), `prefect` (the Prefect server's), and `locks`,
which a `registry_lock` role may only connect to: registrations take a PostgreSQL advisory lock there
(PIPELINE_REGISTRY_LOCK_URL, pipeline/registry/lock.py), so two of them on two machines never interleave.
Prefect gets a `process` work pool `training` and a global concurrency limit `training` of one slot
(flows/pipeline_flow.py holds it around the model stages), and the deployment of prefect.yaml.
Ports: TEAM_PG_PORT (5433), TEAM_MLFLOW_PORT (5001), TEAM_PREFECT_PORT (4201).

Over 300 lines because `Team` is one lifecycle (init, start, deploy, stop) of four servers that share
state; the process helpers are in flows/processes.py.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from flows.processes import (
    alive,
    stop_group,
    wait_for_http,
    wait_for_port,
)
from flows.team_auth import Credentials, write_secret
from pipeline.artifacts import write_text_atomically
from pipeline.errors import DataError

WORK_POOL = "training"
CONCURRENCY_LIMIT = "training"
DATABASES = ("mlflow", "prefect")
LOCK_DB, LOCK_ROLE = "locks", "registry_lock"
PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)  # Debian's layout
SERVER_USER = "postgres"  # PostgreSQL refuses to run as root: as root, its processes run as this user


def check_reachable(path: Path) -> None:
    """As root the server runs as `postgres`: every directory above its data must let it pass."""
    if os.geteuid() != 0:
        return
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.stat().st_mode & 0o001:
            raise DataError(f"{parent}: the `{SERVER_USER}` user, which runs PostgreSQL, cannot enter it "
                            f"(mode {oct(parent.stat().st_mode & 0o777)}); `chmod o+x {parent}` or set TEAM_DIR "
                            "to a directory it can reach")


def team_dir() -> Path:
    return Path(os.environ.get("TEAM_DIR") or ".team").resolve()


def ports() -> dict[str, int]:
    return {"pg": int(os.environ.get("TEAM_PG_PORT", 5433)), "mlflow": int(os.environ.get("TEAM_MLFLOW_PORT", 5001)),
            "prefect": int(os.environ.get("TEAM_PREFECT_PORT", 4201))}


def pg_tool(name: str) -> str:
    for directory in PG_BIN_DIRS:
        if (directory / name).is_file():
            return str(directory / name)
    found = shutil.which(name)
    if not found:
        raise DataError(f"PostgreSQL's {name} was not found: install Debian's postgresql package "
                        "(`make install-team` does, as root)")
    return found


def open_log(path: Path):
    """A server's log, opened for appending without following a symlink: a log name planted as a link to another
    file cannot make this (root) process append to that file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o640)
    except OSError as exc:
        raise DataError(f"{path}: cannot open the log safely ({exc.strerror}); it must be a plain file, "
                        "not a symlink") from None
    return os.fdopen(fd, "ab")


def as_server_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", SERVER_USER, "--", *cmd] if os.geteuid() == 0 else cmd


class Team:
    """The servers of one TEAM_DIR."""

    def __init__(self, root: Path | None = None, port_numbers: dict[str, int] | None = None):
        self.root = (root or team_dir()).resolve()
        self.state_file = self.root / "team.json"
        self.pgpass = self.root / "pgpass"  # the clients' (workers', users'): the registry_lock role's password only
        self.secrets = self.root / "secrets"  # mode 0700: one pgpass per server role, superuser included
        self.logs = self.root / "logs"
        self.pg_logs = self.logs / "postgres"  # the server user's own log directory (it writes nowhere else)
        self.credentials = Credentials(self.root, self.secrets)  # MLflow's and Prefect's (flows/team_auth.py)
        self.state = json.loads(self.state_file.read_text(encoding="utf-8")) if self.state_file.is_file() else {}
        self.ports = self.state.get("ports") or port_numbers or ports()

    # --- what a client needs ------------------------------------------------------------------------
    def urls(self) -> dict[str, str]:
        pg = self.ports["pg"]
        return {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{self.ports['mlflow']}",
                "PREFECT_API_URL": f"http://127.0.0.1:{self.ports['prefect']}/api",
                "PIPELINE_REGISTRY_LOCK_URL": f"postgresql://{LOCK_ROLE}@127.0.0.1:{pg}/{LOCK_DB}",
                "PGPASSFILE": str(self.pgpass)}

    def client_env(self) -> dict[str, str]:
        """This environment pointed at the team: its URLs and credentials win over what the caller's holds."""
        return {**self.prefect_env(), **self.urls()}

    def save(self) -> None:
        self.state["ports"] = self.ports
        write_text_atomically(self.state_file, json.dumps(self.state, indent=2) + "\n")  # never a truncated team.json

    # --- PostgreSQL ---------------------------------------------------------------------------------
    def role_pgpass(self, role: str) -> Path:
        """The pgpass holding `role`'s password alone: the clients' file for the lock role, a secret otherwise."""
        return self.pgpass if role == LOCK_ROLE else self.secrets / f"pgpass-{role}"

    def password(self, role: str) -> str:
        path = self.role_pgpass(role)
        for line in path.read_text(encoding="utf-8").splitlines():
            fields = line.split(":")
            if fields[3] == role:
                return fields[4]
        raise DataError(f"{path}: no password for role {role}")

    def write_passwords(self, passwords: dict[str, str]) -> None:
        """Each role's pgpass line in a file of its own: the MLflow server gets the `mlflow` role's, the Prefect
        server the `prefect` role's, the team's own setup the superuser's, and every client (workers, users'
        shells) only the lock role's, so a client's credentials open the lock database and nothing else."""
        pg = self.ports["pg"]
        database = {"postgres": "*", LOCK_ROLE: LOCK_DB}  # the others: a database of their own name
        self.secrets.mkdir(mode=0o700, exist_ok=True)
        self.secrets.chmod(0o700)
        for role, password in passwords.items():
            write_secret(self.role_pgpass(role), f"127.0.0.1:{pg}:{database.get(role, role)}:{role}:{password}\n")

    def split_legacy_pgpass(self) -> None:
        """A team dir made before the split keeps every role in `pgpass`: move each into its own file."""
        if self.secrets.is_dir() or not self.pgpass.is_file():
            return
        lines = [line.split(":") for line in self.pgpass.read_text(encoding="utf-8").splitlines() if line]
        self.write_passwords({fields[3]: fields[4] for fields in lines})

    def init_postgres(self) -> None:
        data = self.root / "pg"
        if (data / "PG_VERSION").is_file():
            self.split_legacy_pgpass()
            return
        check_reachable(self.root)
        roles = ["postgres", *DATABASES, LOCK_ROLE]
        passwords = {r: secrets.token_urlsafe(24) for r in roles}
        self.write_passwords(passwords)
        data.mkdir(mode=0o700)
        pwfile = self.root / "pg.pw"
        write_secret(pwfile, passwords["postgres"] + "\n")  # 0600 from its first byte, then given to the server user
        if os.geteuid() == 0:
            user = pwd.getpwnam(SERVER_USER)
            for path in (data, pwfile):
                os.chown(path, user.pw_uid, user.pw_gid)
        try:
            subprocess.run(as_server_user([pg_tool("initdb"), "-D", str(data), "-U", "postgres", "-A",
                                           "scram-sha-256", "--pwfile", str(pwfile), "-E", "UTF8", "--locale", "C"]),
                           check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as exc:
            raise DataError(f"initdb failed: {exc.stderr.strip()[-2000:]}") from None
        finally:
            pwfile.unlink()
        self.state["passwords_set"] = False
        self.save()

    def start_postgres(self) -> None:
        data, log = self.root / "pg", self.pg_logs / "postgres.log"
        self.pg_logs.mkdir(mode=0o700, exist_ok=True)
        if os.geteuid() == 0:  # the server user writes its log in a directory of its own, no one else's
            user = pwd.getpwnam(SERVER_USER)
            os.chown(self.pg_logs, user.pw_uid, user.pw_gid)
        options = f"-c listen_addresses=127.0.0.1 -p {self.ports['pg']} -c unix_socket_directories=''"
        proc = subprocess.run(as_server_user([pg_tool("pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
                                              "-w", "-t", "60", "start"]), capture_output=True, text=True)
        if proc.returncode != 0:
            tail = log.read_text(encoding="utf-8", errors="replace")[-2000:] if log.is_file() else proc.stderr
            raise DataError(f"PostgreSQL did not start on 127.0.0.1:{self.ports['pg']}: {tail.strip()}")
        wait_for_port(self.ports["pg"], "PostgreSQL", log=log)

    def connect(self, role: str = "postgres", database: str = "postgres"):
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.ports["pg"], user=role, dbname=database,
                                passfile=str(self.role_pgpass(role)), connect_timeout=10)

    def create_databases(self) -> None:
        from psycopg2 import sql

        conn = self.connect()
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                for role in (*DATABASES, LOCK_ROLE):
                    cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
                    if not cur.fetchone():
                        cur.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(role)),
                                    (self.password(role),))
                for db, owner in [*((d, d) for d in DATABASES), (LOCK_DB, "postgres")]:
                    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
                    if not cur.fetchone():
                        cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(db),
                                                                                 sql.Identifier(owner)))
                        cur.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(db)))
                cur.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(LOCK_DB),
                                                                                sql.Identifier(LOCK_ROLE)))
        finally:
            conn.close()

    # --- servers and workers ------------------------------------------------------------------------
    def spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        with open_log(self.logs / f"{name}.log") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.state.setdefault("processes", {})[name] = proc.pid
        self.save()
        return proc

    def start_mlflow(self) -> None:
        pg, port = self.ports["pg"], self.ports["mlflow"]
        (self.root / "artifacts").mkdir(exist_ok=True)
        mlflow = str(Path(sys.executable).with_name("mlflow"))
        proc = self.spawn("mlflow", [mlflow, "server", "--backend-store-uri", f"postgresql+psycopg2://mlflow@127.0.0.1:{pg}/mlflow",
                                     "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
                                     "--port", str(port), "--workers", "1", "--app-name", "basic-auth"],
                          {**os.environ, "PGPASSFILE": str(self.role_pgpass("mlflow")),
                           **self.credentials.mlflow_server_env()})
        wait_for_http(f"http://127.0.0.1:{port}/health", "the MLflow server", proc, log=self.logs / "mlflow.log")

    def prefect_env(self) -> dict[str, str]:
        home = self.root / "prefect-home"
        home.mkdir(exist_ok=True)
        return {**os.environ, "PREFECT_HOME": str(home), "PGPASSFILE": str(self.pgpass),
                "PREFECT_API_URL": self.urls()["PREFECT_API_URL"], **self.credentials.client_env(),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "true"}

    def start_prefect(self) -> None:
        pg, port = self.ports["pg"], self.ports["prefect"]
        prefect = str(Path(sys.executable).with_name("prefect"))
        env = {**self.prefect_env(), "PGPASSFILE": str(self.role_pgpass("prefect")),
               "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://prefect@127.0.0.1:{pg}/prefect",
               **self.credentials.prefect_server_env()}
        env.pop("PREFECT_API_URL")
        proc = self.spawn("prefect-server", [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env)
        wait_for_http(f"http://127.0.0.1:{port}/api/health", "the Prefect server", proc, log=self.logs / "prefect-server.log")
        self.prefect("work-pool", "create", WORK_POOL, "--type", "process", "--overwrite")
        self.ensure_concurrency_limit()

    def prefect(self, *args: str, cwd: Path | None = None, env: dict | None = None) -> str:
        prefect = str(Path(sys.executable).with_name("prefect"))
        proc = subprocess.run([prefect, *args], env={**self.prefect_env(), **(env or {})}, cwd=cwd,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise DataError(f"prefect {' '.join(args)} failed: {(proc.stderr or proc.stdout).strip()[-2000:]}")
        return proc.stdout

    def ensure_concurrency_limit(self) -> None:
        try:
            self.prefect("global-concurrency-limit", "inspect", CONCURRENCY_LIMIT)
        except DataError:  # not there yet (a first `up`)
            self.prefect("global-concurrency-limit", "create", CONCURRENCY_LIMIT, "--limit", "1")

    def start_worker(self, name: str, project_dir: Path) -> None:
        """A process worker for the pool; its flow runs work in `project_dir` (its own checkout) one at a time."""
        prefect = str(Path(sys.executable).with_name("prefect"))
        env = {**self.client_env(), "PIPELINE_PROJECT_DIR": str(Path(project_dir).resolve()),
               "PIPELINE_TRAINING_LIMIT": CONCURRENCY_LIMIT}
        self.spawn(name, [prefect, "worker", "start", "--pool", WORK_POOL, "--name", name, "--limit", "1"], env)

    def deploy(self, project_dir: Path) -> str:
        """`prefect deploy --all` of the project's prefect.yaml onto this server. PIPELINE_PROJECT_DIR must not be
        set here: `prefect deploy` would bake its value into the pull step, which each worker resolves instead."""
        prefect = str(Path(sys.executable).with_name("prefect"))
        env = self.prefect_env()
        env.pop("PIPELINE_PROJECT_DIR", None)
        proc = subprocess.run([prefect, "--no-prompt", "deploy", "--all"], env=env, cwd=project_dir,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise DataError(f"prefect deploy --all failed: {(proc.stderr or proc.stdout).strip()[-2000:]}")
        return proc.stdout

    def up(self, worker_dirs: list[Path], deploy_from: Path) -> None:
        """Start everything; one worker per entry of worker_dirs, running its flows in that checkout."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(mode=0o755, exist_ok=True)
        self.logs.chmod(0o755)  # written by this user only (the server user has logs/postgres/)
        if os.geteuid() == 0:
            self.root.chmod(0o711)
        self.init_postgres()
        self.start_postgres()
        self.create_databases()
        self.credentials.ensure()
        self.start_mlflow()
        self.start_prefect()
        self.deploy(deploy_from)
        for i, directory in enumerate(worker_dirs):
            self.start_worker(f"worker-{i + 1}", directory)

    def down(self) -> list[str]:
        """Stop workers, servers and PostgreSQL; returns what was stopped."""
        stopped = []
        processes = self.state.get("processes", {})
        for name in sorted(processes, key=lambda n: (not n.startswith("worker"), n)):  # workers first
            if stop_group(processes[name]):
                stopped.append(name)
        self.state["processes"] = {}
        if (self.root / "pg" / "postmaster.pid").is_file():
            subprocess.run(as_server_user([pg_tool("pg_ctl"), "-D", str(self.root / "pg"), "-m", "fast", "-w",
                                           "stop"]), capture_output=True, text=True)
            stopped.append("postgresql")
        if self.state_file.parent.is_dir():
            self.save()
        return stopped

    def status(self) -> dict[str, bool]:
        out = {}
        for name, pid in self.state.get("processes", {}).items():
            out[name] = alive(pid)
        out["postgresql"] = (self.root / "pg" / "postmaster.pid").is_file()
        return out


def main(argv: list[str] | None = None) -> None:
    from pipeline.cli import cli_parser

    parser = cli_parser(__doc__, "python -m flows.team")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start PostgreSQL, MLflow, Prefect and the workers")
    up.add_argument("--workers", type=int, default=2)
    up.add_argument("--project-dir", type=Path, default=Path("."), help="the checkout the workers run flows in")
    sub.add_parser("down", help="stop everything")
    sub.add_parser("status", help="which processes run")
    sub.add_parser("env", help="print the exports a client needs (the servers' credentials included)")
    args = parser.parse_args(argv)
    team = Team()
    if args.command == "up":
        try:
            team.up([args.project_dir] * args.workers, args.project_dir)
        except BaseException:
            team.down()
            raise
        for key, value in team.urls().items():
            print(f"{key}={value}")
        print(f"team: up (PostgreSQL 127.0.0.1:{team.ports['pg']}, MLflow UI {team.urls()['MLFLOW_TRACKING_URI']}, "
              f"Prefect UI http://127.0.0.1:{team.ports['prefect']}, {args.workers} workers); "
              "`eval \"$(.venv/bin/python -m flows.team env)\"` points a shell at it")
    elif args.command == "down":
        print(f"team: stopped {', '.join(team.down()) or 'nothing (nothing was running)'}")
    elif args.command == "status":
        for name, running in team.status().items():
            print(f"{name}: {'running' if running else 'stopped'}")
    else:
        for key, value in {**team.urls(), **team.credentials.client_env()}.items():
            print(f"export {key}={shlex.quote(value)}")


if __name__ == "__main__":
    from pipeline.cli import run_cli

    run_cli(main)
