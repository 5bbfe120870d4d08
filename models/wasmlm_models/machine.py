"""What a measurement ran on: CPU model, cores, SIMD flags, memory, versions."""
from __future__ import annotations

import os
import platform
import resource

SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni",
              "avx_vnni", "avx512_bf16", "amx_int8")


def cpu() -> dict:
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    mem_kib = 0
    try:
        with open("/proc/meminfo") as f:
            mem_kib = int(f.readline().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "simd": [s for s in SIMD_FLAGS if s in flags],
            "memory_gib": round(mem_kib / (1 << 20), 1), "os": platform.platform()}


def peak_rss_mib() -> float:
    """This process's peak resident set. VmHWM, not getrusage: ru_maxrss carries the forking
    parent's peak across exec, VmHWM belongs to this process's own memory."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
