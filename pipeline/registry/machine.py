"""The machine class a result was produced on (CPU ISA level, torch build, BLAS/oneDNN, CUDA and GPU).

Training is byte-identical only within one machine class: kernels differ between CPU generations
(AVX2 vs AVX-512) and builds. `machine_class` is what `reproduce` compares before it promises bytes.
"""

from __future__ import annotations

import platform
import re


def machine_tags() -> dict[str, str]:
    import torch

    config = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=([^,\s]+)", config)
    onednn = re.search(r"(?:oneDNN|MKL-DNN)\s+v?([\d.]+)", config)
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    tags = {
        "machine.arch": platform.machine(),
        "machine.cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine.cpu_model": cpu_model(),
        "machine.torch": torch.__version__,
        "machine.cuda": torch.version.cuda or "none",
        "machine.gpu": ", ".join(gpus) or "none",
        "machine.blas": blas.group(1) if blas else "unknown",
        "machine.onednn": onednn.group(1) if onednn else "unknown",
    }
    tags["machine_class"] = "/".join([tags["machine.arch"], tags["machine.cpu_capability"],
                                      f"torch-{tags['machine.torch']}", f"cuda-{tags['machine.cuda']}",
                                      f"gpu-{tags['machine.gpu']}"])
    return tags


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
