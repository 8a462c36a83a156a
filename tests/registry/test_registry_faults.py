"""Registry decisions under faults: a real MLflow server behind a proxy that answers 503 to chosen endpoints.

Only "no such alias" means no champion. A registry that answers 5xx is asked again with backoff
(pipeline/registry/read.py registry_call) and, when it stays down, the stage fails with the registry as it was:
no alias moved, no `promotion` tag, never a version promoted against the base alone.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from flows.processes import wait_for_http
from pipeline.config import load_params

NAME = "o'brien's \"mcq\" adapter"  # quotes of both kinds: no search filter may break on them
SOURCE = "s3://no-bucket/adapter"  # never read: the registry stores the URI only
METRICS = {"tuned_accuracy": 0.8, "base_accuracy": 0.2, "tuned_eos_rate": 1.0, "tuned_ppl_general": 100.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FaultProxy(ThreadingHTTPServer):
    """Forwards every request to the MLflow server, except that a request whose path ends with a key of
    `failures` gets a 503 while that key's count is above zero (-1: always)."""

    def __init__(self, upstream: int):
        self.upstream, self.failures = upstream, {}
        super().__init__(("127.0.0.1", 0), ProxyHandler)


class ProxyHandler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def forward(self) -> None:
        proxy: FaultProxy = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        for key, left in proxy.failures.items():
            if self.path.split("?")[0].endswith(key):
                if left != 0:
                    proxy.failures[key] = left - 1 if left > 0 else left
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
        conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
        conn.request(self.command, self.path, body=body or None, headers=headers)
        reply = conn.getresponse()
        data = reply.read()
        self.send_response(reply.status)
        for k, v in reply.getheaders():
            if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_DELETE = forward


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    port = free_port()
    log = (root / "mlflow.log").open("w")
    server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
                               f"sqlite:///{root}/mlflow.db", "--default-artifact-root", str(root / "artifacts"),
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proxy = FaultProxy(port)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",  # MLflow's own retries off: ours are under test
           "PIPELINE_REGISTRY_RETRIES": "4", "PIPELINE_REGISTRY_RETRY_WAIT_S": "0.05"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", "the MLflow server", server, log=root / "mlflow.log")
        from mlflow import MlflowClient

        yield proxy, MlflowClient(f"http://127.0.0.1:{proxy.server_address[1]}")
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        proxy.shutdown()
        server.terminate()
        server.wait(timeout=30)
        log.close()


def fresh_model(client, suffix: str) -> tuple[str, object, object]:
    """A model whose version 1 is champion (accuracy 0.7) and an unregistered-gate version 2."""
    name = f"{NAME} {suffix}"
    client.create_registered_model(name)
    first = client.create_model_version(name, SOURCE, tags={"adapter_sha256": f"{suffix}1",
                                                                       "metric.tuned_accuracy": "0.7",
                                                                       "metric.tuned_eos_rate": "1.0",
                                                                       "metric.tuned_ppl_general": "100.0"})
    client.set_registered_model_alias(name, "champion", first.version)
    second = client.create_model_version(name, SOURCE, tags={"adapter_sha256": f"{suffix}2"})
    return name, first, client.get_model_version(name, second.version)


def retries(capsys, call: str) -> int:
    return capsys.readouterr().err.count(f"registry: {call} failed")


def test_a_registry_that_fails_for_a_while_is_asked_again_and_the_champion_counts(registry, capsys):
    from pipeline.registry.gate import decide

    proxy, client = registry
    name, first, second = fresh_model(client, "flaky")
    proxy.failures = {"registered-models/get": 2}
    promoted, alias, reason = decide(load_params(), client, name, second, METRICS, {})
    assert retries(capsys, "get_registered_model") == 2  # MLflow's own retries are off: the 503s reach ours
    assert promoted and alias == "champion" and "registered tags of version 1" in reason, reason
    after = client.get_model_version(name, second.version)
    assert after.tags["previous_champion"] == "1"  # rollback can find its way back
    assert client.get_model_version_by_alias(name, "champion").version == second.version


def test_a_registry_that_stays_down_fails_the_stage_and_moves_nothing(registry, capsys):
    from pipeline.errors import DataError
    from pipeline.registry.gate import decide

    proxy, client = registry
    name, first, second = fresh_model(client, "down")
    proxy.failures = {"registered-models/get": -1}
    with pytest.raises(DataError, match="get_registered_model still failing after 4 attempts"):
        decide(load_params(), client, name, second, METRICS, {})
    assert retries(capsys, "get_registered_model") == 3  # PIPELINE_REGISTRY_RETRIES=4 attempts, then the error
    proxy.failures = {}
    after = client.get_model_version(name, second.version)
    assert "promotion" not in after.tags and "previous_champion" not in after.tags and not after.aliases
    assert client.get_model_version_by_alias(name, "champion").version == first.version


def test_no_champion_alias_is_the_only_no_champion(registry):
    from pipeline.registry.gate import decide

    proxy, client = registry
    name = f"{NAME} first"
    client.create_registered_model(name)
    version = client.create_model_version(name, SOURCE, tags={"adapter_sha256": "first1"})
    proxy.failures = {}
    promoted, alias, reason = decide(load_params(), client, name, client.get_model_version(name, version.version),
                                     METRICS, {})
    assert promoted and alias == "champion" and "no champion" in reason, reason
    assert "previous_champion" not in client.get_model_version(name, version.version).tags


def test_existing_version_is_never_an_outage_read_as_none(registry, capsys):
    from pipeline.errors import DataError
    from pipeline.registry.read import existing_version

    proxy, client = registry
    name, first, second = fresh_model(client, "adopt")
    proxy.failures = {"model-versions/search": 2}
    assert existing_version(client, name, "adopt2").version == second.version  # found after two 503s
    assert retries(capsys, "search_model_versions") == 2
    assert existing_version(client, name, "nothing-like-it") is None
    assert existing_version(client, f"{NAME} flaky", "adopt2") is None  # same sha256 under another name: not ours
    proxy.failures = {"model-versions/search": -1}
    with pytest.raises(DataError, match="search_model_versions still failing"):  # not None: that would duplicate
        existing_version(client, name, "adopt2")
    proxy.failures = {}
