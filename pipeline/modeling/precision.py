"""`sft.compute_dtype: auto` and `sft.quantization: auto`: what is fastest on this machine and fits the budget.

The compute dtype follows a measurement: a short float32 vs bfloat16 matmul, timed before any weight is loaded.
CPUs differ by orders of magnitude here (bfloat16 at 2-4x float32 on AVX512-BF16/AMX, ~0.01x on AVX2, where
torch emulates it), so no constant is right everywhere. A timing is noisy, so it is taken once per machine
class (CPU model, the ISA flags that decide bf16 speed, torch build, threads, GPU) and kept in the cache
directory: every later run on that class reads the same numbers and chooses the same way. On a GPU, bfloat16
where the device supports it (tensor cores), else float16; nothing to time.

Quantization: 4-bit saves memory, not time, on a CPU (bench/README.md, "SFT tokens/s and peak memory": nf4 2 %
slower than unquantized on SmolLM2), so `auto` trains the unquantized base when the preflight estimate fits
`sft.max_memory_gb`, and nf4 + double quant when it does not.

The choice is what the run is: the sft stage trains with it, writes it beside the adapter (precision.json),
and the stages after it (evaluate, register, merge) load the base the same way; it enters the checkpoint
identity, MLflow params and the version's tags (`sft.compute_dtype`, `sft.quantization`, `precision.reason`).
`PIPELINE_PRECISION=<dtype>/<quantization>` pins it (what `reproduce` sets from the registered version).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.config import Params, SftParams
from pipeline.errors import DataError

PRECISION_FILE = "precision.json"  # beside the adapter
PIN_ENV = "PIPELINE_PRECISION"
BF16_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx_vnni", "avx512_vnni")
MATMUL_N = 1024
BF16_MARGIN = 1.25  # bfloat16 must beat float32 by this much: its rounding is not free


def cpu_flags() -> list[str]:
    """The CPU flags that decide how fast bfloat16 runs (from /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    return [flag for flag in BF16_FLAGS if flag in present]
    except OSError:
        pass
    return []


def machine_key() -> dict:
    import torch

    from pipeline.registry.machine import machine_tags

    tags = machine_tags()
    return {"machine_class": tags["machine_class"], "cpu_model": tags["machine.cpu_model"],
            "cpu_flags": cpu_flags(), "threads": torch.get_num_threads()}


def matmul_gflops(dtype_name: str, n: int = MATMUL_N, seconds: float = 0.4) -> float:
    """Sustained GFLOP/s of an n x n matmul in this dtype on the CPU (best of the timed calls)."""
    import torch

    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(dtype)
    b = torch.randn(n, n, generator=generator).to(dtype)
    a @ b  # warm-up: first-call allocation and kernel selection
    best, spent = float("inf"), 0.0
    while spent < seconds:
        start = time.perf_counter()
        a @ b
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
        if took > seconds:  # an emulated dtype: one call says enough
            break
    return 2 * n**3 / best / 1e9


def cache_file(key: dict) -> Path:
    from pipeline.modeling.loading import cache_dir

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "precision" / f"{digest}.json"


def machine_speeds(measure: Callable[[str], float] = matmul_gflops) -> dict:
    """{"float32": GFLOP/s, "bfloat16": GFLOP/s, "machine": key, "cached": bool}: measured once per machine class."""
    key = machine_key()
    path = cache_file(key)
    if path.is_file():
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            if record.get("machine") == key:
                return record | {"cached": True}
        except ValueError:
            pass  # a damaged record: measure again
    record = {"machine": key, "float32": measure("float32"), "bfloat16": measure("bfloat16")}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")  # then one rename: a reader never sees half a record
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return record | {"cached": False}


def choose_dtype(speeds: dict) -> tuple[str, str]:
    """(dtype, why) from the measured CPU matmul speeds."""
    fp32, bf16 = speeds["float32"], speeds["bfloat16"]
    ratio = bf16 / fp32
    where = "measured once for this machine class"  # the same words whether measured now or read back: the
    # record goes beside the adapter, and a resumed run must write the same bytes
    if ratio >= BF16_MARGIN:
        return "bfloat16", f"bfloat16 matmul {bf16:.0f} vs float32 {fp32:.0f} GFLOP/s ({ratio:.2f}x; {where})"
    return "float32", f"bfloat16 matmul {bf16:.1f} vs float32 {fp32:.0f} GFLOP/s ({ratio:.2f}x, under " \
                      f"{BF16_MARGIN}x; {where})"


def gpu_dtype() -> tuple[str, str]:
    import torch

    if torch.cuda.is_bf16_supported():
        return "bfloat16", f"{torch.cuda.get_device_name(0)} supports bfloat16"
    return "float16", f"{torch.cuda.get_device_name(0)} has no bfloat16: float16"


def choose_quantization(estimate_unquantized_gb: float, budget_gb: float) -> tuple[str, str]:
    if estimate_unquantized_gb <= budget_gb:
        return "none", (f"unquantized fits: estimated {estimate_unquantized_gb:.2f} GB <= sft.max_memory_gb "
                        f"{budget_gb:g} (4-bit saves memory, not time)")
    return "nf4", (f"unquantized would not fit: estimated {estimate_unquantized_gb:.2f} GB > sft.max_memory_gb "
                   f"{budget_gb:g}; nf4 + double quant")


def pinned() -> tuple[str, str] | None:
    value = os.environ.get(PIN_ENV)
    if not value:
        return None
    dtype, _, quantization = value.partition("/")
    if dtype not in ("float32", "bfloat16", "float16") or quantization not in ("nf4", "fp4", "int8", "none"):
        raise DataError(f"{PIN_ENV}={value!r}: expected <float32|bfloat16|float16>/<nf4|fp4|int8|none>, "
                          "e.g. float32/none")
    return dtype, quantization


def resolve(sft: SftParams, estimate_gb: Callable[[SftParams], float]) -> tuple[SftParams, dict]:
    """The sft params with `auto` replaced by the choice, and the record of it (what, why).

    `estimate_gb(sft)`: the preflight memory estimate of a concrete configuration."""
    import torch

    record: dict = {"compute_dtype_param": sft.compute_dtype, "quantization_param": sft.quantization}
    if (pin := pinned()) is not None and "auto" in (sft.compute_dtype, sft.quantization):
        dtype, quantization = pin
        record |= {"compute_dtype": dtype if sft.compute_dtype == "auto" else sft.compute_dtype,
                   "quantization": quantization if sft.quantization == "auto" else sft.quantization,
                   "reason": f"pinned by {PIN_ENV}={os.environ[PIN_ENV]} (the registered version's choice)"}
        return sft.model_copy(update={k: record[k] for k in ("compute_dtype", "quantization")}), record
    reasons = []
    dtype = sft.compute_dtype
    if dtype == "auto":
        if torch.cuda.is_available():
            dtype, why = gpu_dtype()
        else:
            speeds = machine_speeds()
            dtype, why = choose_dtype(speeds)
            record["measured_gflops"] = {k: round(speeds[k], 2) for k in ("float32", "bfloat16")}
        reasons.append(f"compute {dtype}: {why}")
    quantization = sft.quantization
    if quantization == "auto":
        quantization, why = choose_quantization(estimate_gb(sft.model_copy(update={"compute_dtype": dtype,
                                                                                   "quantization": "none"})),
                                                sft.max_memory_gb)
        reasons.append(f"quantization {quantization}: {why}")
    record |= {"compute_dtype": dtype, "quantization": quantization,
               "reason": "; ".join(reasons) or "set in params"}
    return sft.model_copy(update={"compute_dtype": dtype, "quantization": quantization}), record


def precision_record(adapter_dir: str | Path) -> dict:
    """The adapter's precision.json ({} for an adapter written before it existed)."""
    path = Path(adapter_dir) / PRECISION_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def trained_precision(params: Params) -> Params:
    """params with the sft precision the adapter at sft.out_dir was trained with (its precision.json), for the
    stages after sft: they must load the base as it was trained. Params without `auto` come back unchanged."""
    sft = params.sft
    if "auto" not in (sft.compute_dtype, sft.quantization):
        return params
    record = precision_record(sft.out_dir)
    if not record:
        raise DataError(f"{Path(sft.out_dir) / PRECISION_FILE}: missing or unreadable; sft.compute_dtype/quantization "
                          "are `auto` and only the sft stage knows what it chose: rerun sft")
    update = {k: record[k] for k in ("compute_dtype", "quantization")}
    return params.model_copy(update={"sft": sft.model_copy(update=update)})
