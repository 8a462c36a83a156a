"""The registry's champion as a REST endpoint (pipeline/serving.py): MLflow's own scoring server, started with
`mlflow models serve -m "models:/<name>@champion" --env-manager local` on 127.0.0.1 against the store of a real
`dvc repro`, answers real HTTP requests exactly as `pipeline.commands.predict` answers the same items; a chat
gets a generation; a malformed request gets a clear 400, never a 500 or a traceback; the version carries
its signature and input example. Collected through tests/integration/test_pipeline_e2e.py (one pipeline run per
worker under `pytest -n 2 --dist loadfile`)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.postgres import free_port
from tests.helpers.project import MODEL_NAME, REPO_ROOT, venv_env
from tests.helpers.readme import bare_env

URI = f"models:/{MODEL_NAME}@champion"


@pytest.fixture(scope="module")
def endpoint(pipeline_run, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    # The README's `make serve-model`, typed in a shell with no venv on PATH (the scoring server execs `uvicorn`
    # from the venv: the target must put it there). VENV names this test's venv; `-o install` keeps make from
    # reinstalling into it; the project copy holds no Makefile, so it is the repository's.
    env = bare_env(pipeline_run["uri"])
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["make", "-f", str(REPO_ROOT / "Makefile"), "-o", "install", "serve-model",
                                 f"VENV={sys.prefix}", f"MODEL_NAME={MODEL_NAME}", f"SERVE_PORT={port}"],
                                cwd=pipeline_run["project"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, log_path.read_text(errors="replace")[-4000:]
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as ping:
                    if ping.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, log_path.read_text(errors="replace")[-4000:]
            time.sleep(1)
        yield url, log_path
    finally:
        import os
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def post(url: str, body) -> tuple[int, dict | str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/invocations", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        try:
            return exc.code, json.loads(text)
        except ValueError:
            return exc.code, text


def eval_items(project: Path) -> list[dict]:
    rows = [json.loads(line) for line in (project / "data/sample/eval.jsonl").read_text(encoding="utf-8").splitlines()]
    return [{k: r[k] for k in ("passage", "question", "choices")} for r in rows]


def test_mcq_requests_answer_as_predict_does_one_and_a_batch(pipeline_run, endpoint, tmp_path):
    url, _ = endpoint
    project = pipeline_run["project"]
    items = eval_items(project)
    status, batch = post(url, {"dataframe_records": items})
    assert status == 200, batch
    answers = batch["predictions"]
    assert len(answers) == len(items)
    for item, answer in zip(items, answers, strict=True):
        assert len(answer["logprobs"]) == len(item["choices"])
        assert answer["prediction"] == max(range(len(item["choices"])), key=answer["logprobs"].__getitem__) + 1
        assert answer["option"] == item["choices"][answer["prediction"] - 1]
    status, one = post(url, {"inputs": [items[0]]})  # batch of one, the other request shape
    assert status == 200 and one["predictions"][0]["prediction"] == answers[0]["prediction"], one

    # The same items through `pipeline.commands.predict` (the CLI a user runs): the same options chosen.
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "pipeline.commands.predict", "--model-uri", URI, "--input", str(path)],
                          cwd=project, env=venv_env(MLFLOW_TRACKING_URI=pipeline_run["uri"]), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    predicted = [json.loads(line)["prediction"] for line in proc.stdout.splitlines()]
    assert predicted == [a["prediction"] for a in answers]


def test_a_chat_request_gets_a_generation(endpoint):
    url, _ = endpoint
    chat = {"dataframe_records": [{"messages": [{"role": "user", "content": "지문을 읽고 답하세요."}]}],
            "params": {"max_new_tokens": 8}}
    status, body = post(url, chat)
    assert status == 200, body
    assert isinstance(body["predictions"][0]["generation"], str)


@pytest.mark.parametrize(("body", "says"), [
    ({"dataframe_records": [{"passage": "p", "question": "Which one?"}]}, "record 0: required: `choices` is missing"),
    ({"dataframe_records": [{"question": "Which one?", "choices": ["only"], "passage": "p"}]}, "record 0"),
    ({"dataframe_records": [{"messages": [{"role": "robot", "content": "hi"}]}]}, "messages[0]"),
    ({"inputs": [{"passage": "p", "question": "q", "choices": ["a", "b"]}], "params": {"max_new_tokens": 0}},
     "max_new_tokens"),
    (b"{not json", ""),
])
def test_a_malformed_request_gets_a_clear_400_without_a_traceback(endpoint, body, says):
    url, log = endpoint
    status, answer = post(url, body)
    assert 400 <= status < 500, (status, answer)
    text = json.dumps(answer) if isinstance(answer, dict) else answer
    assert says in text and "Traceback" not in text, text[-2000:]


def test_the_version_carries_its_signature_and_input_example(client):
    from mlflow.models import get_model_info

    info = get_model_info(URI)
    assert info.flavors["python_function"]["loader_module"] == "pipeline.serving"
    inputs = {c["name"] for c in info.signature.inputs.to_dict()}
    assert {"passage", "question", "choices", "messages"} <= inputs
    assert info.signature.params.to_dict()[0]["name"] == "max_new_tokens"
    assert info.saved_input_example_info["serving_input_path"] == "serving_input_example.json"
