"""SFT benchmark: the pipeline's `sft` stage against a plain TRL script, packing, fp32 vs bf16, 4-bit memory, MFU.

    .venv/bin/python bench/sft_bench.py             # full run (median of 3), writes bench/results.json
    .venv/bin/python bench/sft_bench.py --quick     # smoke test: 1 repeat, few steps, bench/results-quick.json

Everything is built offline in a temp dir: the sample data (pipeline.data.synthetic.generate), the
built-in tiny base (pipeline.modeling.tiny.build_tiny_base, params.yaml `base.tiny`), and a larger random-init
Llama (same tokenizer, hidden 768 × 8 layers, ~57.5 M parameters). Each case runs in a fresh
subprocess (no RSS, thread pool or allocator state leaks between cases), repeats are interleaved
(case A, B, C, A, B, C, ...) so slow drift of the machine hits every case alike, and the median
is reported. Settings come from params.yaml's `sft` section (batch size, max_length, lr, LoRA,
quantization, seed) with, for both sides alike, no evaluation and no checkpoints (they are not
training throughput). See bench/README.md for what each case measures and the formulas.

Cases
- SFT tokens/s: `pipeline.training.sft.train_adapter` unpacked and packed, and bench/plain_trl_sft.py unpacked,
  on the tiny base with fp32 compute; then the pipeline stage with fp32 and bf16 compute on the tiny
  and the ~57.5 M model. Tokens are counted by bench/throughput.py, identically for both sides.
- Load RSS: peak RSS (ru_maxrss of the child) while loading the ~57.5 M model with the pipeline's
  `load_causal_lm`, nf4 + double quant vs fp32; also the increase over the same process before the
  load (interpreter + torch/transformers/bitsandbytes imports), and the RSS left after the load.
- Matmul: fp32 and bf16 square matmul GFLOP/s at a few sizes (torch's default thread count); the peak
  per dtype is the denominator of MFU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1",
           "GX_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
os.environ.update(OFFLINE)

# The larger model: Llama-shaped, random init, the tiny base's tokenizer (its BPE ends at ~1.1 k tokens on the
# sample text, below base.tiny.vocab_size), tied embeddings: 8 × (4·768² + 3·768·2048) + 1094·768 = 57.5 M
# parameters, 98.5 % of them in the linear layers that 4-bit quantization applies to.
BIG = {"hidden_size": 768, "num_layers": 8, "num_heads": 12, "intermediate_size": 2048, "vocab_size": 2048,
       "max_position_embeddings": 512}

MODES = {
    # steps: cap per SFT run; warmup: leading steps left out of the timing; budget_s: a run stops at the first
    # step end past this (bf16 on a CPU without bf16 instructions is very slow); matmul sizes and time per size.
    # max_step_s: a bf16 case is skipped when its predicted seconds per step (the same model's fp32 step time in
    # this repeat × the fp32/bf16 matmul peak ratio of this run) exceed it.
    # once_step_s: a case whose first run took longer per step runs only once (later repeats would add little
    # but many minutes).
    "full": {"repeats": 3, "tiny": {"steps": 60, "warmup": 5, "budget_s": 120},
             "big": {"steps": 15, "warmup": 2, "budget_s": 240}, "max_step_s": 900, "once_step_s": 60,
             "matmul_sizes": [256, 512, 1024, 2048], "matmul_budget_s": 3.0, "matmul_max_call_s": 150.0},
    "quick": {"repeats": 1, "tiny": {"steps": 8, "warmup": 2, "budget_s": 10},
              "big": {"steps": 2, "warmup": 1, "budget_s": 5}, "max_step_s": 120, "once_step_s": 60,
              "matmul_sizes": [256, 512], "matmul_budget_s": 0.5, "matmul_max_call_s": 3.0},
}

SFT_CASES = [  # key, runner, model, compute dtype, packing (False, or the packing_strategy)
    ("pipeline_tiny_fp32", "pipeline", "tiny", "float32", False),
    ("pipeline_tiny_fp32_packed", "pipeline", "tiny", "float32", "bfd"),  # params.yaml's default strategy
    # Not a goal case: `wrapped` packing keeps a padded-batch layout (rows of max_length, no position_ids), so
    # attention stays per row instead of over the whole flattened batch (see README).
    ("pipeline_tiny_fp32_packed_wrapped", "pipeline", "tiny", "float32", "wrapped"),
    ("plain_tiny_fp32", "plain", "tiny", "float32", False),
    # The plain script plus one step: the adapter cast back to fp32 after TRL's QLoRA bf16 cast, as the
    # pipeline does. Not a goal case: it shows how much of the pipeline/plain difference that cast explains.
    ("plain_tiny_fp32_adapter_fp32", "plain", "tiny", "float32", False),
    ("pipeline_tiny_bf16", "pipeline", "tiny", "bfloat16", False),
    ("pipeline_big_fp32", "pipeline", "big", "float32", False),
    ("pipeline_big_bf16", "pipeline", "big", "bfloat16", False),
]
LOAD_CASES = [("load_big_nf4", "nf4"), ("load_big_fp32", "none")]


# ----------------------------------------------------------------------------------------------- workers
# Each runs in its own process: `sft_bench.py --worker KIND SPEC.json RESULT.json`.

def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker_matmul(spec: dict) -> dict:
    import torch

    out = {"threads": torch.get_num_threads(), "sizes": {}}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        rates, predicted = {}, None
        for n in spec["sizes"]:
            if predicted is not None and predicted > spec["max_call_s"]:
                rates[str(n)] = {"skipped": f"one call predicted {predicted:.0f} s"}
                continue
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            start = time.perf_counter()
            a @ b  # warm-up (and the first estimate of one call's time)
            one = time.perf_counter() - start
            samples = [one] if one >= spec["budget_s"] else []  # a slow size: the first call is the sample
            deadline = time.perf_counter() + spec["budget_s"]
            while not samples or (time.perf_counter() < deadline and len(samples) < 50):
                t = time.perf_counter()
                a @ b
                samples.append(time.perf_counter() - t)
            best = min(samples)
            rates[str(n)] = {"gflops_peak": 2 * n**3 / best / 1e9, "gflops_median": 2 * n**3 / statistics.median(samples) / 1e9,
                             "calls": len(samples)}
            predicted = min(one, best) * 8  # the next size is 2x: 8x the work
        out["sizes"][name] = rates
        measured = [r["gflops_peak"] for r in rates.values() if "gflops_peak" in r]
        out[name] = {"gflops_peak": max(measured) if measured else float("nan"),
                     "at_size": max((r["gflops_peak"], n) for n, r in rates.items() if "gflops_peak" in r)[1]
                     if measured else None}
    return out


def proc_status() -> dict:
    """VmRSS, VmHWM, RssAnon, RssFile of this process in MB (Linux /proc)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) / 1024
    return out


def worker_load(spec: dict) -> dict:
    """Load the model with the pipeline's loader and run one forward pass (a usable, resident model).

    The forward matters: fp32 safetensors are memory-mapped, so right after from_pretrained most fp32
    weights are not resident yet; the first forward pages them in. Quantizing reads every weight at load.
    """
    import gc
    import resource
    import threading

    import bitsandbytes  # noqa: F401  both cases import the same libraries before the baseline is taken
    import torch
    import transformers  # noqa: F401

    from pipeline.modeling.loading import load_causal_lm

    before = proc_status()
    try:  # reset VmHWM to the current RSS: the load-phase peak, without the import-time peak
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    peak_anon, done = [before["RssAnon"]], threading.Event()

    def sample():  # anonymous (private) memory has no kernel high-water mark: sample it
        while not done.wait(0.005):
            peak_anon[0] = max(peak_anon[0], proc_status()["RssAnon"])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    model = load_causal_lm(spec["model_dir"], spec["quantization"], True, "float32")
    load_s = time.perf_counter() - start
    gc.collect()
    loaded = proc_status()
    with torch.no_grad():
        model(input_ids=torch.randint(0, model.config.vocab_size, (1, 128)))
    done.set()
    sampler.join()
    after = proc_status()
    peak_anon[0] = max(peak_anon[0], after["RssAnon"])
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_mb": before["VmRSS"], "anon_before_mb": before["RssAnon"],
            "load_phase_peak_mb": after["VmHWM"], "peak_anon_mb": peak_anon[0],
            "rss_after_load_mb": loaded["VmRSS"], "rss_after_forward_mb": after["VmRSS"],
            "file_after_forward_mb": after["RssFile"], "anon_after_forward_mb": after["RssAnon"],
            "load_s": load_s, "footprint_mb": model.get_memory_footprint() / 2**20, "threads": torch.get_num_threads()}


def worker_pipeline(spec: dict) -> dict:
    from pipeline.modeling.chat_template import chat_tokenizer
    from pipeline.config import load_params
    from pipeline.data.formats import Example
    from pipeline.training.sft import train_adapter
    from throughput import Throughput

    params = load_params(ROOT / "params.yaml")
    params = params.model_copy(update={"sft": params.sft.model_copy(update=spec["sft_overrides"])})
    examples = [Example(**json.loads(line)) for line in Path(spec["examples"]).read_text(encoding="utf-8").splitlines()]
    tokenizer = chat_tokenizer(spec["model_dir"], params.task.chat_template)
    meter = Throughput(warmup=spec["warmup"], budget_s=spec["budget_s"])
    train_adapter(Path(spec["model_dir"]), examples, tokenizer, params, Path(spec["out_dir"]), callbacks=[meter])
    return meter.result()


def run_worker(kind: str, spec_file: str, result_file: str) -> None:
    sys.path.insert(0, str(ROOT))
    spec = json.loads(Path(spec_file).read_text(encoding="utf-8"))
    result = {"matmul": worker_matmul, "load": worker_load, "pipeline": worker_pipeline}[kind](spec)
    Path(result_file).write_text(json.dumps(result, indent=2), encoding="utf-8")


# ----------------------------------------------------------------------------------------------- setup

def build_inputs(tmp: Path) -> dict:
    """Sample data, the tiny base, the ~57.5 M model and the two training files (pipeline examples, plain messages)."""
    sys.path.insert(0, str(ROOT))
    from pipeline.modeling.tiny import build_tiny_base, build_tiny_model
    from pipeline.modeling.chat_template import chat_tokenizer
    from pipeline.config import TinyModelParams, load_params
    from pipeline.data.readers import read_records
    from pipeline.data.formats import to_example
    from pipeline.modeling.loading import save_atomically
    from pipeline.data.synthetic import generate
    from pipeline.training.sft import training_rows

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    params = load_params(ROOT / "params.yaml")
    data = tmp / "data"
    generate(params.sample_data, params.sample_data.num_choices, params.seed, data)
    examples = [to_example(r, "mcq", params.task) for r in read_records(data / "train.jsonl")]
    texts = ["\n".join(m["content"] for m in e.messages) for e in examples]  # as the base stage does
    texts += [r.value["text"] for r in read_records(data / "domain_train.txt")]
    build_tiny_base(texts, params.base.tiny, params.seed, tmp / "tiny")
    tokenizer = chat_tokenizer(tmp / "tiny", params.task.chat_template)
    big = build_tiny_model(tokenizer, TinyModelParams(**BIG), params.seed)
    save_atomically(tmp / "big", big, tokenizer)
    del big
    (tmp / "examples.jsonl").write_text("".join(json.dumps(e.to_json(), ensure_ascii=False) + "\n" for e in examples),
                                        encoding="utf-8")
    (tmp / "messages.jsonl").write_text("".join(json.dumps({"messages": e.messages}, ensure_ascii=False) + "\n"
                                                for e in examples), encoding="utf-8")
    lengths = [len(r["input_ids"]) for r in training_rows(examples, tokenizer)]
    return {"params": params, "examples": len(examples), "lengths": lengths,
            "models": {"tiny": model_stats(tmp / "tiny", params.sft), "big": model_stats(tmp / "big", params.sft)}}


def model_stats(model_dir: Path, sft) -> dict:
    """Counts for the FLOP formula, from the architecture on the meta device (as the pipeline's preflight)."""
    import torch

    from pipeline.training.preflight import meta_model, trainable_count

    model, config = meta_model(str(model_dir))
    head = model.get_output_embeddings()
    linear = sum(m.in_features * m.out_features for m in model.modules()
                 if isinstance(m, torch.nn.Linear) and m is not head)
    return {"total_params": sum(p.numel() for p in model.parameters()),
            "matmul_params": linear + head.in_features * head.out_features,  # every weight a token multiplies
            "linear_params": linear, "lora_params": trainable_count(model, sft),
            "layers": config.num_hidden_layers, "hidden": config.hidden_size, "vocab": config.vocab_size}


# ----------------------------------------------------------------------------------------------- running

def run_case(kind: str, spec: dict, tmp: Path, name: str, timeout: float) -> dict:
    run_dir = Path(tempfile.mkdtemp(dir=tmp, prefix=f"{name}-"))
    spec_file, result_file, log = run_dir / "spec.json", run_dir / "result.json", run_dir / "log.txt"
    spec_file.write_text(json.dumps(spec, indent=2), encoding="utf-8")
    if kind == "plain":
        cmd = [sys.executable, str(BENCH / "plain_trl_sft.py"), spec["model_dir"], spec["messages"],
               str(spec_file), str(run_dir / "out"), str(result_file)]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, str(spec_file), str(result_file)]
    start = time.perf_counter()
    try:
        with log.open("w") as f:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                  env={**os.environ, **OFFLINE})
        error = None if proc.returncode == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        error = f"timeout after {timeout:.0f} s"
    wall = time.perf_counter() - start
    if error or not result_file.is_file():
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        print(f"  {name}: FAILED ({error or 'no result'}); log {log}:\n    " + "\n    ".join(tail), flush=True)
        return {"error": error or "no result", "log": str(log), "wall_s": wall}
    result = json.loads(result_file.read_text(encoding="utf-8"))
    result["wall_s"] = wall
    shutil.rmtree(run_dir / "out", ignore_errors=True)
    return result


def sft_spec(key: str, runner: str, model_dir: Path, dtype: str, packing: bool, cfg: dict, setup: dict, tmp: Path) -> dict:
    overrides = {"max_steps": cfg["steps"], "compute_dtype": dtype, "packing": bool(packing),
                 **({"packing_strategy": packing} if packing else {}), "eval_steps": None, "save_steps": None, "early_stopping_patience": None}
    common = {"model_dir": str(model_dir), "warmup": cfg["warmup"], "budget_s": cfg["budget_s"]}
    if runner == "pipeline":
        out = Path(tempfile.mkdtemp(dir=tmp, prefix="adapter-"))
        return {**common, "examples": str(tmp / "examples.jsonl"), "out_dir": str(out / "adapter"),
                "sft_overrides": overrides}
    sft = setup["params"].sft.model_dump() | overrides
    return {**common, **sft, "messages": str(tmp / "messages.jsonl"), "seed": setup["params"].seed,
            "warmup_skip": cfg["warmup"], "adapter_fp32": key.endswith("adapter_fp32")}


def predicted_step_s(cases: dict, key: str, dtype: str, matmul: dict, rep: int) -> float | None:
    """For a bf16 case: the same model's fp32 seconds per step in this repeat × fp32/bf16 matmul peak ratio."""
    if dtype != "bfloat16":
        return None
    fp32 = cases.get(key.replace("bf16", "fp32"), [])
    fp32 = fp32[rep] if len(fp32) > rep else {}
    f, b = ((matmul.get(d) or {}).get("gflops_peak") for d in ("float32", "bfloat16"))
    if "seconds_per_step" not in fp32 or not f or not b:
        return None
    return fp32["seconds_per_step"] * max(1.0, f / b)


def train_flops(stats: dict, r: dict) -> float:
    """LoRA training FLOPs of the timed window (see bench/README.md):
    4·N_matmul·T (forward 2 + backward-to-activations 2 through frozen weights; no weight gradients)
    + 6·N_lora·T (forward, activation and weight gradients of the adapters)
    + 12·L·H·Σ s² (attention scores and values, forward + backward, per sequence of length s)."""
    return (4 * stats["matmul_params"] + 6 * stats["lora_params"]) * r["tokens"] + 12 * stats["layers"] * stats["hidden"] * r["sum_sq"]


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def machine_info() -> dict:
    flags, model = set(), platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    import torch
    import transformers
    import trl

    return {"cpu": model, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "bf16_instructions": sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2"}),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "loadavg_start": os.getloadavg()}


# ----------------------------------------------------------------------------------------------- report

def fmt(v, spec=".0f", none="—"):
    return none if v is None else format(v, spec)


def summarise(cases: dict, setup: dict, matmul: dict) -> dict:
    peaks = {d: (matmul.get(d) or {}).get("gflops_peak") for d in ("float32", "bfloat16")}
    summary = {}
    for key, runner, model, dtype, packing in SFT_CASES:
        runs = [r for r in cases.get(key, []) if "error" not in r and "skipped" not in r]
        skipped = [r["skipped"] for r in cases.get(key, []) if "skipped" in r]
        stats = setup["models"][model]
        per_run = []
        for r in runs:
            achieved = train_flops(stats, r) / r["seconds"] / 1e9
            per_run.append({"tokens_per_s": r["tokens_per_s"], "gflops": achieved,
                            "mfu_fp32": achieved / peaks["float32"] if peaks["float32"] else None,
                            "mfu_bf16": achieved / peaks["bfloat16"] if peaks["bfloat16"] else None,
                            "mfu_own": achieved / peaks[dtype] if peaks[dtype] else None})
        tps = [p["tokens_per_s"] for p in per_run]
        summary[key] = {
            "runner": runner, "model": model, "compute_dtype": dtype, "packing": packing, "runs": len(runs),
            "failed": sum("error" in r for r in cases.get(key, [])), "skipped": skipped[0] if skipped else None,
            "warmup_included": any(r.get("warmup_included") for r in runs),
            "tokens_per_s": median(tps), "tokens_per_s_min": min(tps) if tps else None,
            "tokens_per_s_max": max(tps) if tps else None,
            "padded_tokens_per_s": median([r["padded_tokens_per_s"] for r in runs]),
            "timed_steps": median([r["timed_steps"] for r in runs]),
            "seconds_per_step": median([r["seconds_per_step"] for r in runs]),
            "achieved_gflops": median([p["gflops"] for p in per_run]),
            "mfu_vs_fp32_peak": median([p["mfu_fp32"] for p in per_run]),
            "mfu_vs_bf16_peak": median([p["mfu_bf16"] for p in per_run]),
            "mfu_vs_own_dtype_peak": median([p["mfu_own"] for p in per_run]),
            "peak_rss_mb": median([r["peak_rss_mb"] for r in runs]),
            "adapter_dtype": runs[0].get("adapter_dtype") if runs else None,
            "trainable_params": runs[0].get("trainable_params") if runs else None,
        }
    for key, _ in LOAD_CASES:
        runs = [r for r in cases.get(key, []) if "error" not in r]
        summary[key] = {"runs": len(runs), **{k: median([r[k] for r in runs]) for k in
                        ("peak_rss_mb", "rss_before_mb", "load_phase_peak_mb", "peak_anon_mb", "anon_before_mb",
                         "rss_after_load_mb", "rss_after_forward_mb", "file_after_forward_mb", "load_s", "footprint_mb")}}
        if runs:
            summary[key]["anon_increase_mb"] = median([r["peak_anon_mb"] - r["anon_before_mb"] for r in runs])

    def ratio(a, b):
        return a / b if a is not None and b else None

    s = summary
    plain = s["plain_tiny_fp32"]["tokens_per_s"]
    nf4, fp32 = s["load_big_nf4"], s["load_big_fp32"]
    goals = {
        "pipeline_vs_plain": {"value": ratio(s["pipeline_tiny_fp32"]["tokens_per_s"], plain), "goal": ">= 1.0"},
        "pipeline_packed_vs_plain": {"value": ratio(s["pipeline_tiny_fp32_packed"]["tokens_per_s"], plain), "goal": ">= 1.3"},
        "pipeline_packed_wrapped_vs_plain": {"value": ratio(s["pipeline_tiny_fp32_packed_wrapped"]["tokens_per_s"], plain),
                                             "goal": "(no goal; other packing strategy)"},
        "plain_adapter_fp32_vs_plain": {"value": ratio(s["plain_tiny_fp32_adapter_fp32"]["tokens_per_s"], plain),
                                        "goal": "(explains the pipeline/plain gap)"},
        "pipeline_vs_plain_adapter_fp32": {"value": ratio(s["pipeline_tiny_fp32"]["tokens_per_s"],
                                                          s["plain_tiny_fp32_adapter_fp32"]["tokens_per_s"]),
                                           "goal": "(like for like)"},
        "nf4_vs_fp32_peak_rss": {"value": ratio(nf4.get("peak_rss_mb"), fp32.get("peak_rss_mb")), "goal": "<= 0.35"},
        "nf4_vs_fp32_anon_increase": {"value": ratio(nf4.get("anon_increase_mb"), fp32.get("anon_increase_mb")),
                                      "goal": "(no goal: private memory the load adds)"},
        "nf4_vs_fp32_weights": {"value": ratio(nf4.get("footprint_mb"), fp32.get("footprint_mb")),
                                "goal": "(no goal: weight bytes)"},
        "bf16_vs_fp32_tiny": {"value": ratio(s["pipeline_tiny_bf16"]["tokens_per_s"], s["pipeline_tiny_fp32"]["tokens_per_s"]),
                              "goal": "(choose the faster)"},
        "bf16_vs_fp32_big": {"value": ratio(s["pipeline_big_bf16"]["tokens_per_s"], s["pipeline_big_fp32"]["tokens_per_s"]),
                             "goal": "(choose the faster)"},
        "bf16_vs_fp32_matmul_peak": {"value": ratio(peaks["bfloat16"], peaks["float32"]), "goal": "(the issue expected ~6)"},
    }
    for name, g in goals.items():
        v, goal = g["value"], g["goal"]
        g["met"] = (None if v is None or not goal[:2] in (">=", "<=")
                    else (v >= float(goal[3:]) if goal.startswith(">=") else v <= float(goal[3:])))
    return {"cases": summary, "goals": goals, "matmul_peak_gflops": peaks}


def tables(result: dict) -> str:
    s, goals, setup = result["summary"]["cases"], result["summary"]["goals"], result["setup"]
    m = result["matmul"]
    lines = [f"### SFT throughput ({result['mode']} mode, median of {result['repeats']}; tokens = non-pad tokens trained)", "",
             "| case | model | compute | packing | tokens/s | min–max | s/step | timed steps | GFLOP/s | MFU vs fp32 peak | MFU vs bf16 peak | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    names = {"tiny": f"tiny {setup['models']['tiny']['total_params'] / 1e6:.2f} M",
             "big": f"{setup['models']['big']['total_params'] / 1e6:.1f} M"}
    for key, runner, model, dtype, packing in SFT_CASES:
        c = s[key]
        label = {"pipeline": "pipeline stage", "plain": "plain TRL script"}[runner]
        if key.endswith("adapter_fp32"):
            label += " + adapter cast to fp32"
        if c["runs"] == 0:
            status = "failed" if c["failed"] else f"skipped: {c['skipped']}" if c["skipped"] else "not run"
            lines.append(f"| {label} | {names[model]} | {dtype} | {packing or 'no'} | {status} | | | | | | | |")
            continue
        lines.append(f"| {label} | {names[model]} | {dtype} | {packing or 'no'} | {fmt(c['tokens_per_s'])} | "
                     f"{fmt(c['tokens_per_s_min'])}–{fmt(c['tokens_per_s_max'])} | {fmt(c['seconds_per_step'], '.2f')} | "
                     f"{fmt(c['timed_steps'], '.0f')}{' (warm-up incl.)' if c['warmup_included'] else ''} | {fmt(c['achieved_gflops'], '.2f')} | {fmt(c['mfu_vs_fp32_peak'], '.1%')} | "
                     f"{fmt(c['mfu_vs_bf16_peak'], '.1%')} | {fmt(c['peak_rss_mb'])} |")
    nf4, fp32 = s["load_big_nf4"], s["load_big_fp32"]
    lines += ["", f"### Loading the {names['big']} model (pipeline.modeling.loading.load_causal_lm) + one 128-token forward", "",
              "| load | peak RSS MB (ru_maxrss) | RSS before load | load-phase peak RSS | peak anon increase | "
              "RSS after load | RSS after forward | of which file-backed | weights MB | load s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for label, c in (("nf4 + double quant", nf4), ("fp32", fp32)):
        lines.append(f"| {label} | {fmt(c.get('peak_rss_mb'))} | {fmt(c.get('rss_before_mb'))} | {fmt(c.get('load_phase_peak_mb'))} | "
                     f"{fmt(c.get('anon_increase_mb'))} | {fmt(c.get('rss_after_load_mb'))} | {fmt(c.get('rss_after_forward_mb'))} | "
                     f"{fmt(c.get('file_after_forward_mb'))} | {fmt(c.get('footprint_mb'))} | {fmt(c.get('load_s'), '.2f')} |")
    lines += ["", f"### Matmul GFLOP/s (square n×n, {m.get('threads', '?')} torch threads; peak = fastest call)", "",
              "| n | fp32 | bf16 |", "|---|---|---|"]
    sizes = m.get("sizes", {})
    for n in sorted({int(k) for d in sizes.values() for k in d}):
        cells = []
        for d in ("float32", "bfloat16"):
            r = sizes.get(d, {}).get(str(n), {})
            cells.append(fmt(r.get("gflops_peak"), ".1f") if "gflops_peak" in r else r.get("skipped", "—"))
        lines.append(f"| {n} | {cells[0]} | {cells[1]} |")
    lines += ["", "### Goals and comparisons", "", "| comparison | measured | goal | met |", "|---|---|---|---|"]
    labels = {"pipeline_vs_plain": "pipeline stage / plain TRL script (tokens/s, unpacked, tiny fp32)",
              "pipeline_packed_vs_plain": "pipeline stage packed / plain TRL script unpacked",
              "plain_adapter_fp32_vs_plain": "plain script with its adapter cast to fp32 / plain script",
              "pipeline_vs_plain_adapter_fp32": "pipeline stage / plain script with its adapter cast to fp32",
              "nf4_vs_fp32_peak_rss": "peak RSS loading the ≥50 M model: nf4 / fp32",
              "nf4_vs_fp32_anon_increase": "peak anonymous (private) memory added by load + forward: nf4 / fp32",
              "nf4_vs_fp32_weights": "weight bytes (get_memory_footprint): nf4 / fp32",
              "pipeline_packed_wrapped_vs_plain": "pipeline stage packed (wrapped) / plain TRL script unpacked",
              "bf16_vs_fp32_tiny": "bf16 / fp32 compute, SFT tokens/s, tiny model",
              "bf16_vs_fp32_big": f"bf16 / fp32 compute, SFT tokens/s, {names['big']} model",
              "bf16_vs_fp32_matmul_peak": "bf16 / fp32 peak matmul GFLOP/s"}
    for key, g in goals.items():
        met = {True: "yes", False: "**no**", None: "—"}[g["met"]]
        lines.append(f"| {labels[key]} | {fmt(g['value'], '.2f')}x | {g['goal']} | {met} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 repeat, few steps, small matmuls (3-4 min: ~10 fresh processes importing torch/TRL)")
    ap.add_argument("--repeats", type=int, help="runs per case (default 3; --quick: 1)")
    ap.add_argument("--out", type=Path, help="results file (default bench/results.json; --quick: bench/results-quick.json)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (models, data, per-case logs)")
    ap.add_argument("--only", help="comma-separated case keys to run (default: all), e.g. pipeline_tiny_fp32,plain_tiny_fp32")
    ap.add_argument("--worker", nargs=3, metavar=("KIND", "SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run_worker(*args.worker)
        return
    only = set(args.only.split(",")) if args.only else None
    unknown = (only or set()) - {c[0] for c in SFT_CASES} - {c[0] for c in LOAD_CASES}
    if unknown:
        raise SystemExit(f"--only: unknown case(s) {', '.join(sorted(unknown))}")
    mode = "quick" if args.quick else "full"
    cfg = MODES[mode]
    repeats = args.repeats or cfg["repeats"]
    out = args.out or BENCH / ("results-quick.json" if args.quick else "results.json")
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="sft-bench-"))
    print(f"sft_bench: {mode} mode, {repeats} repeat(s); work dir {tmp}", flush=True)
    try:
        machine = machine_info()
        t = time.perf_counter()
        setup = build_inputs(tmp)
        print(f"  setup: data + tiny base + {setup['models']['big']['total_params'] / 1e6:.1f} M model in "
              f"{time.perf_counter() - t:.0f} s; {setup['examples']} examples, {sum(setup['lengths']):,} tokens, "
              f"longest {max(setup['lengths'])} (max_length {setup['params'].sft.max_length})", flush=True)
        timeout = 3600 if mode == "full" else 600
        matmul = run_case("matmul", {"sizes": cfg["matmul_sizes"], "budget_s": cfg["matmul_budget_s"],
                                     "max_call_s": cfg["matmul_max_call_s"]}, tmp, "matmul", timeout)
        print(f"  matmul: fp32 peak {fmt((matmul.get('float32') or {}).get('gflops_peak'), '.1f')} GFLOP/s, "
              f"bf16 peak {fmt((matmul.get('bfloat16') or {}).get('gflops_peak'), '.1f')} GFLOP/s "
              f"({matmul['wall_s']:.0f} s)", flush=True)
        cases: dict[str, list] = {}
        for rep in range(repeats):
            for key, runner, model, dtype, packing in SFT_CASES:
                if only and key not in only:
                    continue
                first = (cases.get(key) or [{}])[0]
                if rep > 0 and first.get("seconds_per_step", 0) > cfg["once_step_s"]:
                    print(f"  [{rep + 1}/{repeats}] {key}: not repeated ({first['seconds_per_step']:.0f} s/step in the "
                          f"first run > {cfg['once_step_s']} s)", flush=True)
                    continue
                predicted = predicted_step_s(cases, key, dtype, matmul, rep)
                if predicted is not None and predicted > cfg["max_step_s"]:
                    reason = (f"predicted {predicted:.0f} s/step (fp32 step × fp32/bf16 matmul ratio) "
                              f"> {cfg['max_step_s']} s")
                    cases.setdefault(key, []).append({"skipped": reason})
                    print(f"  [{rep + 1}/{repeats}] {key}: skipped, {reason}", flush=True)
                    continue
                spec = sft_spec(key, runner, tmp / model, dtype, packing, cfg[model], setup, tmp)
                r = run_case(runner, spec, tmp, key, timeout)
                cases.setdefault(key, []).append(r)
                if "error" not in r:
                    print(f"  [{rep + 1}/{repeats}] {key}: {r['tokens_per_s']:,.0f} tokens/s over {r['timed_steps']} steps "
                          f"({r['seconds_per_step']:.2f} s/step, peak RSS {r['peak_rss_mb']:.0f} MB, {r['wall_s']:.0f} s wall)",
                          flush=True)
            for key, quantization in LOAD_CASES:
                if only and key not in only:
                    continue
                r = run_case("load", {"model_dir": str(tmp / "big"), "quantization": quantization}, tmp, key, timeout)
                cases.setdefault(key, []).append(r)
                if "error" not in r:
                    print(f"  [{rep + 1}/{repeats}] {key}: peak RSS {r['peak_rss_mb']:.0f} MB, load-phase peak "
                          f"{r['load_phase_peak_mb']:.0f} MB, anon +{r['peak_anon_mb'] - r['anon_before_mb']:.0f} MB "
                          f"({r['wall_s']:.0f} s wall)", flush=True)
        machine["loadavg_end"] = os.getloadavg()
        result = {"mode": mode, "repeats": repeats, "machine": machine,
                  "settings": {"sft": setup["params"].sft.model_dump(), "seed": setup["params"].seed,
                               "overrides": "eval_steps/save_steps/early_stopping off; max_steps, compute_dtype, packing per case",
                               "tiny": cfg["tiny"], "big": cfg["big"], "big_model": BIG},
                  "setup": {"examples": setup["examples"], "tokens": sum(setup["lengths"]),
                            "mean_length": sum(setup["lengths"]) / len(setup["lengths"]),
                            "longest": max(setup["lengths"]), "models": setup["models"]},
                  "matmul": matmul, "runs": cases, "wall_s": time.perf_counter() - started}
        result["summary"] = summarise(cases, result["setup"], matmul)
        text = tables(result)
        print()
        print(text)
        load = machine["loadavg_start"][0], machine["loadavg_end"][0]
        print(f"\n{machine['cpu']}, {machine['cpus']} CPUs, torch threads {machine['torch_threads']}, "
              f"flags {' '.join(machine['bf16_instructions']) or 'none of avx2/avx512f/avx512_bf16/amx'}; "
              f"1-min load average {load[0]:.2f} at start, {load[1]:.2f} at end; total {result['wall_s']:.0f} s")
        result["table_markdown"] = text
        out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"results written to {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
