"""Starting and stopping the team's server processes: wait for a port or URL, stop a process group.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from pipeline.errors import DataError


def wait_for_port(port: int, what: str, process: subprocess.Popen | None = None, timeout: float = 120,
                  log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text(encoding="utf-8", errors="replace")[-3000:] if log and log.is_file() else ""
            raise DataError(f"{what} exited with code {process.returncode} before listening on 127.0.0.1:{port}"
                            f"{'; log tail:' + chr(10) + tail if tail else ''}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise DataError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s" +
                    (f" (log: {log})" if log else ""))


def wait_for_http(url: str, what: str, process: subprocess.Popen, timeout: float = 180, log: Path | None = None):
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(encoding="utf-8", errors="replace")[-3000:] if log and log.is_file() else ""
            raise DataError(f"{what} exited with code {process.returncode}; log tail:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise DataError(f"{what} did not answer {url} within {timeout:.0f} s (log: {log})")


def group_members(pgid: int) -> list:
    """The live (not zombie) processes of process group pgid: a server with its workers and helpers."""
    import psutil

    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (OSError, psutil.Error):
            continue
    return members


def alive(pid: int) -> bool:
    return bool(group_members(pid))


def stop_group(pid: int, grace: float = 20) -> bool:
    """SIGTERM the process group of pid (each server was started in its own session), SIGKILL what is left after
    `grace` seconds; reaps the leader when it is this process's child. Returns whether anything was running."""
    import psutil

    members = group_members(pid)
    if not members:
        reap(pid)
        return False
    for proc in members:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    reap(pid, grace)
    _, left = psutil.wait_procs(group_members(pid), timeout=grace)
    for proc in left:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=5)
    reap(pid)
    return True


def reap(pid: int, timeout: float = 0) -> None:
    """Collect the exit status of our own child `pid` (so it leaves no zombie); wait up to `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return  # not our child (started by an earlier `team up`), or already collected
        if done or time.monotonic() >= deadline:
            return
        time.sleep(0.2)
