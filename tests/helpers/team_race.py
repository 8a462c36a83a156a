"""One side of a concurrent registration (tests/integration/test_team.py): wait for the common start time, then apply the
promotion gate to a version under the registry lock, exactly as `register` does (pipeline.registry.gate.decide).

    python -m tests.helpers.team_race <model name> <version> <tuned_accuracy> <start unix time>
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mlflow import MlflowClient
from pipeline.config import load_params
from pipeline.registry.gate import decide
from pipeline.registry.lock import registry_lock
from pipeline.tracking import tracking_uri


def main() -> None:
    name, version, accuracy, start = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    params = load_params(Path(__file__).resolve().parents[2] / "params.yaml")
    params = params.model_copy(update={"registry": params.registry.model_copy(update={"model_name": name,
                                                                                      "guards": []})})
    metrics = {"tuned_accuracy": accuracy, "base_accuracy": 0.0}
    client = MlflowClient()
    time.sleep(max(0.0, start - time.time()))  # both sides start within a few milliseconds
    with registry_lock(tracking_uri(params), name):
        promoted, alias, reason = decide(params, client, name, client.get_model_version(name, version), metrics, {})
    print(f"version {version}: {alias} ({reason})")


if __name__ == "__main__":
    main()
