"""Keep big temporaries in reused heap memory instead of fresh pages: glibc `mallopt` for the decode loop.

Every decoding step allocates and frees a few buffers of 0.5–5 MB (a row of logits over a 151,936-token vocabulary
is 0.6 MB; the cumulative sum that `sampling.sample` inverts is 1.2 MB). glibc serves such sizes with fresh `mmap`s
or trims them off the heap top when freed, so the next step page-faults them in again; on this VM a page fault is
expensive (`scripts/drafter_kernels.py`, a fresh process each: drawing one token from a 151,936-entry distribution
took 1.1–1.6 ms, 0.10–0.12 ms with the settings below; how bad it is depends on the process's allocation history). Raising the mmap threshold and the trim threshold makes those buffers come from heap memory that stays
mapped. It costs at most `trim_threshold` bytes of freed memory kept resident.

Process-wide, so the library never does it on import: the `verispec` command calls `tune_allocator()` at start
(opt out with VERISPEC_NO_MALLOPT=1); library users may call it themselves. A no-op (returns False) off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

NO_MALLOPT_ENV = "VERISPEC_NO_MALLOPT"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>


def tune_allocator(mmap_threshold: int = 32 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Serve allocations below `mmap_threshold` from the heap and keep up to `trim_threshold` freed bytes mapped.
    Returns True when glibc accepted both settings."""
    if os.environ.get(NO_MALLOPT_ENV, "") not in ("", "0"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(mallopt(M_TRIM_THRESHOLD, int(trim_threshold)))
