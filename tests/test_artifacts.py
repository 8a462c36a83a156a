"""Whole-file writes (pipeline/artifacts.py write_text_atomically): a process killed mid-write leaves the previous
file, never a truncated one that breaks the next command (team.json, evaluate's metrics and predictions)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WRITER = """
import sys
from pipeline.artifacts import write_text_atomically
text = "x" * (400 * 1024 * 1024)
print("ready", flush=True)
write_text_atomically(sys.argv[1], text)
"""


def test_a_write_killed_midway_leaves_the_previous_file_whole(tmp_path):
    target = tmp_path / "team.json"
    target.write_text('{"ports": {"pg": 5433}}\n', encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 60
    while not any(p.stat().st_size > 0 for p in tmp_path.glob(".team.json-*")):  # the new bytes are being written
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.read_text(encoding="utf-8") == '{"ports": {"pg": 5433}}\n'  # the old file, whole


def test_a_finished_write_replaces_the_file_and_keeps_its_mode(tmp_path):
    from pipeline.artifacts import write_text_atomically

    target = tmp_path / "metrics.json"
    target.write_text("old\n", encoding="utf-8")
    target.chmod(0o600)
    write_text_atomically(target, "new\n")
    assert target.read_text(encoding="utf-8") == "new\n" and target.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
