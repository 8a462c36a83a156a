"""Machine tags (pipeline/registry/machine.py): this machine's real values, and the class `reproduce` compares."""

from __future__ import annotations

import platform
import re
from pathlib import Path

import torch

from pipeline.registry import machine
from pipeline.registry.machine import machine_tags

# torch.backends.cpu.get_cpu_capability()'s documented values (torch 2.13).
CPU_CAPABILITIES = {"DEFAULT", "VSX", "Z VECTOR", "NO AVX", "AVX2", "AVX512", "SVE256"}


def test_tags_are_this_machines():
    tags = machine_tags()
    assert tags["machine.arch"] == platform.machine()
    assert tags["machine.cpu_capability"] in CPU_CAPABILITIES
    assert f"CPU capability usage: {tags['machine.cpu_capability']}" in torch.__config__.show()
    assert tags["machine.torch"] == torch.__version__
    assert tags["machine.cuda"] == (torch.version.cuda or "none")
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    assert tags["machine.gpu"] == (", ".join(gpus) or "none")
    assert f"BLAS_INFO={tags['machine.blas']}," in torch.__config__.show() or tags["machine.blas"] == "unknown"
    assert re.fullmatch(r"\d+(\.\d+)+", tags["machine.onednn"]) or tags["machine.onednn"] == "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        assert f"model name\t: {tags['machine.cpu_model']}\n" in cpuinfo.read_text(encoding="utf-8")
    assert all(isinstance(v, str) and v for v in tags.values())  # MLflow tags: non-empty strings


def test_class_is_composed_of_the_tags_without_the_cpu_model():
    """The model name varies within one class (same ISA level and builds give the same kernels): it is not in it."""
    tags = machine_tags()
    assert tags["machine_class"] == (f"{tags['machine.arch']}/{tags['machine.cpu_capability']}/torch-{tags['machine.torch']}"
                                     f"/cuda-{tags['machine.cuda']}/gpu-{tags['machine.gpu']}")
    assert tags["machine.cpu_model"] not in tags["machine_class"]
    assert machine_tags()["machine_class"] == tags["machine_class"]  # stable between calls


def test_a_build_without_blas_or_onednn_info_says_unknown(monkeypatch):
    monkeypatch.setattr(torch.__config__, "show", lambda: "PyTorch built with:\n  - GCC 13.3\n")
    tags = machine_tags()
    assert tags["machine.blas"] == "unknown" and tags["machine.onednn"] == "unknown"


def test_cpu_model_without_proc_cpuinfo_is_platforms(monkeypatch):
    def unreadable(*args, **kwargs):
        raise PermissionError("/proc/cpuinfo")

    monkeypatch.setattr(machine, "open", unreadable, raising=False)  # shadows the builtin inside pipeline.machine
    assert machine.cpu_model() == (platform.processor() or "unknown")
