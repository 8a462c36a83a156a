"""The MLflow UI in a real browser: headless Chromium over the e2e run's store, served by `make ui`.

Chromium (Debian `chromium`; `.ci/run` installs it) renders each page with a virtual-time budget, then
dumps the DOM and a screenshot; no WebDriver needed. The DOM is checked against what the REST API says
(the pipeline's parent run, its five stage runs, version 1 holding the `champion` alias). Screenshots
land in the test's tmp dir and in `reports/ui/` of the project copy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.helpers.project import MODEL_NAME, mlflow_ui

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NEEDS_CHROMIUM = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                                    "(apt-get install chromium chromium-driver; .ci/run does this)")

EXPERIMENT = "finetune-pipeline"
STAGES = {"validate", "dapt", "sft", "evaluate", "register"}
VIRTUAL_TIME_MS = 20_000  # page time Chromium lets pass (fast-forwarded when idle) before it dumps; ~4-10 s real


class Dom(HTMLParser):
    """A dumped DOM: its visible text, its links (href, text) and its table rows (role="row"): each row's text
    and the titles of its alias tags (the registry's `@ champion` chips)."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self.links: list[tuple[str, str]] = []
        self.rows: list[dict] = []
        self._hidden = self._divs = 0
        self._row_at: int | None = None
        self._link: list | None = None
        self.feed(html)
        self.close()
        self.text = " ".join(" ".join(self.chunks).split())

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("script", "style"):
            self._hidden += 1
        elif tag == "a":
            self._link = [attrs.get("href") or "", []]
        elif tag == "div":
            self._divs += 1
            if attrs.get("role") == "row" and self._row_at is None:
                self._row_at = self._divs
                self.rows.append({"text": [], "aliases": []})
        if self._row_at is not None and attrs.get("title") and "alias" in (attrs.get("data-component-id") or ""):
            self.rows[-1]["aliases"].append(attrs["title"])

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._hidden -= 1
        elif tag == "a" and self._link is not None:
            self.links.append((self._link[0], " ".join(" ".join(self._link[1]).split())))
            self._link = None
        elif tag == "div":
            if self._row_at == self._divs:
                row = self.rows[-1]
                row["text"] = " ".join(" ".join(row["text"]).split())
                self._row_at = None
            self._divs -= 1

    def handle_data(self, data):
        if self._hidden:
            return
        self.chunks.append(data)
        if self._link is not None:
            self._link[1].append(data)
        if self._row_at is not None:
            self.rows[-1]["text"].append(data)


def chromium(url: str, out: Path, name: str, budget_ms: int) -> bool:
    """One headless Chromium on url with a fresh profile: out/<name>.png (1400x900) and out/<name>.html (the
    rendered DOM). It runs in its own process group, killed on the way out. False if it hung."""
    profile = out / f"chromium-profile-{name}"
    profile.mkdir()
    with open(out / f"{name}.html", "wb") as dom:
        proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--window-size=1400,900", f"--virtual-time-budget={budget_ms}",
             f"--screenshot={out / f'{name}.png'}", "--dump-dom", url],
            stdout=dom, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        assert proc.wait(timeout=30) == 0, f"chromium exited {proc.returncode} on {url}"
        return True
    except subprocess.TimeoutExpired:
        return False
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


def render(pages: dict[str, str], out: Path) -> dict[str, Dom]:
    """Each page in its own Chromium, one after the other (2 cores: in parallel is slower); the parsed DOMs.

    Chromium hangs when the budget runs out before the page has loaded (seen on a loaded machine with
    3 s): one retry with twice the budget."""
    for name, url in pages.items():
        assert chromium(url, out, name, VIRTUAL_TIME_MS) or chromium(url, out, name, 2 * VIRTUAL_TIME_MS), \
            f"chromium hung twice on {url}"
    return {name: Dom((out / f"{name}.html").read_text(encoding="utf-8", errors="replace")) for name in pages}


def api(base: str, path: str, body: dict | None = None, **query: str) -> dict:
    url = f"{base}/api/2.0/mlflow/{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


@pytest.mark.extended  # a browser on the whole default pipeline run: `make test-extended` (CI runs it)
@NEEDS_CHROMIUM
def test_ui_in_chromium_shows_the_pipeline_run_and_the_champion(pipeline_run, tmp_path):
    project = pipeline_run["project"]
    root = Path(pipeline_run["uri"].removeprefix("sqlite:///")).parent
    with mlflow_ui(root, cwd=project) as base:
        # What the UI must show, from the REST API: the run behind the champion, its parent and stages.
        experiment_id = api(base, "experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]["experiment_id"]
        champion = api(base, "registered-models/alias", name=MODEL_NAME, alias="champion")["model_version"]
        assert champion["version"] == "1"
        register_run = api(base, "runs/get", run_id=champion["run_id"])["run"]
        parent_id = next(t["value"] for t in register_run["data"]["tags"] if t["key"] == "mlflow.parentRunId")
        parent_name = api(base, "runs/get", run_id=parent_id)["run"]["info"]["run_name"]
        assert parent_name.startswith("pipeline-"), parent_name
        runs = api(base, "runs/search", {"experiment_ids": [experiment_id], "max_results": 1000}).get("runs", [])
        children = {r["info"]["run_id"]: r["info"]["run_name"] for r in runs
                    if {"key": "mlflow.parentRunId", "value": parent_id} in r["data"].get("tags", [])}
        assert set(children.values()) == STAGES, children

        doms = render({
            "experiment-runs": f"{base}/#/experiments/{experiment_id}/runs",
            "pipeline-run": f"{base}/#/experiments/{experiment_id}/runs/{parent_id}",
            "registered-model": f"{base}/#/models/{MODEL_NAME}",
        }, tmp_path)

    # (a) The experiment's "Training runs" table lists the pipeline run (stages nest under it, collapsed)
    # and counts every run of the experiment.
    page = doms["experiment-runs"]
    assert EXPERIMENT in page.text and "Training runs" in page.text, page.text[:2000]
    run_link = f"#/experiments/{experiment_id}/runs/{parent_id}"
    assert (run_link, parent_name) in page.links, (parent_name, page.text[:2000])
    count = re.search(r"(\d+) matching runs?", page.text)
    assert count and int(count.group(1)) == len(runs), (len(runs), page.text[:2000])
    # The pipeline run's own page names it and links its five stage runs.
    page = doms["pipeline-run"]
    assert parent_name in page.text and "Child runs" in page.text, page.text[:2000]
    for run_id, name in children.items():
        assert (f"#/experiments/{experiment_id}/runs/{run_id}", name) in page.links, (name, page.text[:2000])

    # (b) The registered model's versions table: version 1 carries the `champion` alias tag, no other row does.
    page = doms["registered-model"]
    assert MODEL_NAME in page.text, page.text[:2000]
    assert (f"#/models/{MODEL_NAME}/versions/1", "Version 1") in page.links, page.text[:2000]
    with_champion = [row["text"][:40] for row in page.rows if "champion" in row["aliases"]]
    assert len(with_champion) == 1 and re.match(r"Version 1\b", with_champion[0]), (with_champion, page.text[:2000])

    # Screenshots: here and in the project's reports/ui/, each a real rendering (not a blank page).
    reports = project / "reports" / "ui"
    reports.mkdir(parents=True, exist_ok=True)
    for name in doms:
        shot = tmp_path / f"{name}.png"
        assert shot.exists() and shot.stat().st_size > 10_000, shot
        shutil.copy2(shot, reports / shot.name)
        assert (reports / shot.name).stat().st_size > 10_000
