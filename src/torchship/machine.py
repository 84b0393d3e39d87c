"""What this machine's CPU can do (from /proc/cpuinfo), and how many cores this process may use."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path


def cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's cpuset, taskset), not the host's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@lru_cache(maxsize=1)
def cpu() -> tuple[str, frozenset]:
    """(model name, ISA flags); ("unknown", {}) where /proc/cpuinfo cannot be read."""
    name, flags = "unknown", frozenset()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == "unknown":
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return name, flags


def native_bf16() -> bool:
    """The CPU computes in bf16 natively (avx512_bf16 or AMX); elsewhere bf16 is emulated and slower than fp32."""
    flags = cpu()[1]
    return "avx512_bf16" in flags or "amx_bf16" in flags


NO_BF16 = "this CPU has no native bf16 (no avx512_bf16 or amx_bf16): bf16 would be emulated, slower than fp32"


ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
             "amx_int8")


def info(threads: int | None = None) -> dict:
    """The facts a report records: CPU and its matrix-relevant ISA flags, cores, threads, library versions, GPU."""
    from importlib.metadata import PackageNotFoundError, version
    name, flags = cpu()
    versions = {}
    for package in ("torch", "onnxruntime", "openvino"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    gpu = None
    if "torch" in versions:
        import torch
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": name, "cores": cores(), "isa": [f for f in ISA_FLAGS if f in flags], "threads": threads or cores(),
            "versions": versions, "cuda": gpu}
