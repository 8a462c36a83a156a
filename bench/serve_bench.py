"""Latency and throughput of a registered version behind `mlflow models serve` (pipeline/serving.py) against
`pipeline.commands.predict` on the same items. Not a test: a measurement, one JSON line.

    MLFLOW_TRACKING_URI=sqlite:///mlflow/mlflow.db .venv/bin/python bench/serve_bench.py \
        --model-uri models:/mcq-reading-adapter@champion --items data/sample/eval.jsonl [--limit 64]

It starts the server on a free 127.0.0.1 port (one worker), waits for /ping, sends every item once as a batch-1
request (requests/s, median and p95 latency), then in batches of 16 (items/s), checks the answers are the same
either way, stops the server, and times `predict` (a fresh process: load + score) on the same items.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, records: list[dict]) -> list[dict]:
    body = json.dumps({"dataframe_records": records}).encode()
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)["predictions"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-uri", required=True)
    ap.add_argument("--items", type=Path, required=True)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    rows = [json.loads(line) for line in args.items.read_text(encoding="utf-8").splitlines() if line.strip()]
    items = [{k: r[k] for k in ("passage", "question", "choices") if r.get(k) is not None} for r in rows][:args.limit]
    port = free_port()
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    start = time.monotonic()
    server = subprocess.Popen([mlflow_bin, "models", "serve", "-m", args.model_uri, "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port), "-w", "1"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True,
                              env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=5).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() - start > 600:
                    raise SystemExit("the server did not start")
                time.sleep(0.5)
        ready_s = time.monotonic() - start
        post(url, items[:1])  # warm-up
        latencies, single = [], []
        for item in items:
            t = time.perf_counter()
            single += post(url, [item])
            latencies.append(time.perf_counter() - t)
        t = time.perf_counter()
        batched = [p for i in range(0, len(items), args.batch) for p in post(url, items[i:i + args.batch])]
        batch_s = time.perf_counter() - t
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8") as f:
        f.write("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline.commands.predict", "--model-uri", args.model_uri,
                           "--input", f.name], capture_output=True, text=True)
    predict_s = time.perf_counter() - t
    os.unlink(f.name)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    predicted = [json.loads(line)["prediction"] for line in proc.stdout.splitlines()]
    latencies.sort()
    print(json.dumps({
        "model_uri": args.model_uri, "items": len(items), "server_ready_s": round(ready_s, 1),
        "batch1_requests_per_s": round(len(items) / sum(latencies), 2),
        "batch1_latency_median_ms": round(1000 * statistics.median(latencies), 1),
        "batch1_latency_p95_ms": round(1000 * latencies[int(0.95 * (len(latencies) - 1))], 1),
        f"batch{args.batch}_items_per_s": round(len(items) / batch_s, 2),
        "predict_process_s": round(predict_s, 1), "predict_items_per_s_incl_load": round(len(items) / predict_s, 2),
        "same_options_batch1_vs_batched": [p["prediction"] for p in single] == [p["prediction"] for p in batched],
        "same_options_as_predict": [p["prediction"] for p in batched] == predicted}))


if __name__ == "__main__":
    main()
