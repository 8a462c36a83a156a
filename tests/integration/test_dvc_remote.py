"""A team's shared DVC remote on a real SSH server: one clone pushes, a second clone pulls and has nothing to rerun.

The test starts its own OpenSSH server (Debian `openssh-server`; `.ci/run` installs it) on a free 127.0.0.1
port, with a host key and a client key made here and key authentication only; the system's sshd service and
~/.ssh are not used (the dvc processes get a HOME of their own). Clone A, a copy of the project, builds the
`sample_data` stage, tracks a file of its own with `dvc add` and pushes both to `ssh://127.0.0.1:<port>/...`;
clone B, a `git clone` of A, pulls them over SSH and finds the stage up to date.

Where the settings go is the part a team gets wrong: the remote's URL is committed in .dvc/config, while who
logs in, with which key, is each person's .dvc/config.local (`dvc remote modify --local`; DVC keeps that file
out of git). Needs the `team` extra (dvc-ssh).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.helpers.project import git, make_project_copy, venv_env

SSHD = Path("/usr/sbin/sshd")  # sshd re-executes itself for each connection: it must be started by absolute path
DVC = Path(sys.executable).parent / "dvc"

pytestmark = [
    pytest.mark.extended,
    pytest.mark.skipif(not SSHD.exists(), reason="sshd is not installed (apt-get install openssh-server; .ci/run does this)"),
    pytest.mark.skipif(importlib.util.find_spec("dvc_ssh") is None,
                       reason="dvc-ssh is not installed: pip install -c constraints.txt -e '.[test,real,team]'"),
]


@dataclass
class SshServer:
    port: int
    user: str
    client_key: Path
    log: Path
    pid: int = 0
    # sshd processes still serving a connection when the server was stopped (dvc should have closed them all).
    leftover: list[int] = field(default_factory=list)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def children(pid: int) -> list[int]:
    """Live processes whose parent is pid (from /proc; a zombie counts as gone)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
            if int(ppid) == pid and state != "Z":
                found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ssh_banner(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        return s.recv(64)


@contextlib.contextmanager
def sshd(root: Path, timeout: float = 20) -> Iterator[SshServer]:
    """An OpenSSH server on a free 127.0.0.1 port that lets the current user in with a key made here, only."""
    root.mkdir()
    user = pwd.getpwuid(os.geteuid()).pw_name
    host_key, client_key = root / "host_ed25519", root / "client_ed25519"
    for key in (host_key, client_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key.name, "-f", str(key)],
                       check=True, capture_output=True)
    authorized_keys = root / "authorized_keys"
    authorized_keys.write_text(Path(f"{client_key}.pub").read_text())
    port = free_port()
    config = root / "sshd_config"
    config.write_text("\n".join([
        "ListenAddress 127.0.0.1",
        f"Port {port}",
        f"HostKey {host_key}",
        f"PidFile {root / 'sshd.pid'}",
        f"AuthorizedKeysFile {authorized_keys}",
        "AuthenticationMethods publickey",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        f"AllowUsers {user}",
        "StrictModes no",  # the keys live under /tmp, which is world-writable: strict modes would refuse them
        "UsePAM no",
        "X11Forwarding no",
        "AllowTcpForwarding no",
        "Subsystem sftp internal-sftp",
        "LogLevel VERBOSE",  # logs "Accepted publickey for <user>": the test checks that the key is what let DVC in
    ]) + "\n")
    if os.geteuid() == 0:
        # sshd run by root needs its privilege-separation directory, which Debian's ssh.service creates at boot
        # (RuntimeDirectory=sshd) and the package does not: an image where the service never ran lacks it.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    check = subprocess.run([str(SSHD), "-t", "-f", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, f"sshd rejects {config}:\n{check.stderr}"

    log = root / "sshd.log"
    server = SshServer(port=port, user=user, client_key=client_key, log=log)
    with log.open("wb") as out:
        proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server.pid = proc.pid
    try:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError):
                if ssh_banner(port).startswith(b"SSH-2.0-"):
                    break
            assert proc.poll() is None, f"sshd exited {proc.returncode}:\n{server.log_text()}"
            assert time.monotonic() < deadline, f"sshd did not answer on 127.0.0.1:{port} in {timeout:.0f} s\n{server.log_text()}"
            time.sleep(0.1)
        yield server
    finally:
        # A connection's sshd exits soon after its client does; give the last one a moment before stopping.
        deadline = time.monotonic() + 10
        while children(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        server.leftover = children(proc.pid)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for pid in server.leftover:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def run_dvc(cwd: Path, *args: str, env: dict[str, str]) -> str:
    proc = subprocess.run([str(DVC), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"dvc {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def clone_with_team_data(dest: Path, own_data: bytes, env: dict[str, str]) -> Path:
    """Clone A: the project, its sample_data stage built, and a file of the team's own data `dvc add`ed."""
    clone = make_project_copy(dest)
    (clone / "data/team").mkdir(parents=True)
    (clone / "data/team/glossary.tsv").write_bytes(own_data)
    run_dvc(clone, "add", "data/team/glossary.tsv", env=env)
    run_dvc(clone, "repro", "sample_data", env=env)
    return clone


def nothing_to_rerun(clone: Path, env: dict[str, str]) -> None:
    """After a pull: the pulled output matches dvc.lock, so the stage is skipped, not rerun, and the clone is
    clean and in sync with the remote `team`."""
    status = run_dvc(clone, "status", "sample_data", "data/team/glossary.tsv.dvc", env=env)
    assert "Data and pipelines are up to date." in status, status
    before = {p: p.stat().st_mtime_ns for p in (clone / "data/sample").iterdir()}
    repro = run_dvc(clone, "repro", "sample_data", env=env)
    assert "Running stage" not in repro and "didn't change, skipping" in repro, repro
    assert {p: p.stat().st_mtime_ns for p in (clone / "data/sample").iterdir()} == before
    assert git(clone, "status", "--porcelain").stdout == ""
    cloud = run_dvc(clone, "status", "--cloud", env=env)
    assert "Cache and remote 'team' are in sync." in cloud, cloud


def connect_as_member(clone: Path, server: SshServer, env: dict[str, str]) -> None:
    """What each person runs once in their clone: their login and key, kept out of git."""
    run_dvc(clone, "remote", "modify", "--local", "team", "user", server.user, env=env)
    run_dvc(clone, "remote", "modify", "--local", "team", "keyfile", str(server.client_key), env=env)


def test_a_push_from_one_clone_over_ssh_is_pulled_by_another_with_nothing_to_rerun(tmp_path):
    home = tmp_path / "home"  # no ~/.ssh (known_hosts, config, default keys) of the machine's user
    home.mkdir()
    env = venv_env(HOME=str(home))
    env.pop("SSH_AUTH_SOCK", None)
    store = tmp_path / "store"  # the server's directory that the team shares
    own_data = b"term\tmeaning\n\xec\xa7\x80\xeb\xac\xb8\tpassage\n"

    with sshd(tmp_path / "sshd") as server:
        # Clone A: the project, a stage output and a file of the team's own data.
        a = clone_with_team_data(tmp_path / "a", own_data, env)
        run_dvc(a, "remote", "add", "-d", "team", f"ssh://127.0.0.1:{server.port}{store}", env=env)
        connect_as_member(a, server, env)
        git(a, "add", "-A")
        git(a, "commit", "-q", "-m", "sample data, glossary, the team remote")
        committed = git(a, "show", "HEAD:.dvc/config").stdout
        assert f"ssh://127.0.0.1:{server.port}{store}" in committed and "keyfile" not in committed
        assert ".dvc/config.local" not in git(a, "ls-files").stdout
        assert "keyfile" in (a / ".dvc/config.local").read_text()
        run_dvc(a, "push", env=env)

        # On the server: every object of A's cache, content-addressed; the glossary's object is its bytes.
        pushed = files_under(store / "files/md5")
        assert pushed == files_under(a / ".dvc/cache/files/md5")
        lock = yaml.safe_load((a / "dvc.lock").read_text())
        sample_md5 = lock["stages"]["sample_data"]["outs"][0]["md5"]
        assert sample_md5.endswith(".dir") and f"{sample_md5[:2]}/{sample_md5[2:]}" in pushed
        glossary_md5 = yaml.safe_load((a / "data/team/glossary.tsv.dvc").read_text())["outs"][0]["md5"]
        assert pushed[f"{glossary_md5[:2]}/{glossary_md5[2:]}"] == own_data

        # Clone B: git brings the pointers, dvc pull the data (B's cache starts empty).
        git(tmp_path, "clone", "-q", str(a), str(tmp_path / "b"))
        b = tmp_path / "b"
        assert not (b / "data/sample").exists() and not (b / "data/team/glossary.tsv").exists()
        assert not (b / ".dvc/config.local").exists()
        connect_as_member(b, server, env)
        # Only this stage has run (dvc.lock has no entry for the rest of the pipeline): pull what A built.
        run_dvc(b, "pull", "sample_data", "data/team/glossary.tsv.dvc", env=env)
        assert files_under(b / "data/sample") == files_under(a / "data/sample")
        assert (b / "data/team/glossary.tsv").read_bytes() == own_data

        nothing_to_rerun(b, env)

    log = server.log_text()
    assert log.count(f"Accepted publickey for {server.user} from 127.0.0.1") >= 2, log  # A's push, B's pull
    assert server.leftover == [], f"sshd still served connections {server.leftover} after the last dvc command"
    assert not alive(server.pid) and not children(server.pid)
    with pytest.raises(ConnectionRefusedError):
        ssh_banner(server.port)
