"""What this CPU can run, read once from /proc/cpuinfo (empty where unknown): kernels choose their path from it.

A flag listed there is not proof that the VM lets a process use the instruction (an AMX flag can be listed and
refused), so the kernels built from these flags also run a self-test before use (`verispec.kernels.q4kernel`).
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags ("avx2", "avx512_vnni", ...)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return frozenset()


def native_bf16() -> bool:
    """Whether the CPU has bf16 instructions (AVX512-BF16 or AMX); False where unknown."""
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags
