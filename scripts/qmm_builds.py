"""One linear layer's time on two (or more) builds of the native kernels, alternated in one process, with a check
that every build gives the same bits: the A/B behind a kernel change (an old build stays in verispec's kernel cache
under its source hash, e.g. `native_avx512_vnni_0eee031ea3cf2bca`).

Usage: python scripts/qmm_builds.py BUILD_A,BUILD_B TYPE:N:K ...   e.g. Q4_K:8960:1536 Q6_K:1536:8960
(median of 40 alternated calls per row count; 2 threads)
"""

from __future__ import annotations

import importlib.util
import sys
import time

import torch

from verispec.home import cache_root
from verispec.kernels.ggml_blocks import TYPES, decode, pack, quantize


def load(build: str):
    so = next((cache_root() / "kernels" / build).glob("*.so"))
    spec = importlib.util.spec_from_file_location(so.name.split(".")[0], so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    torch.set_num_threads(2)
    mods = [load(b) for b in sys.argv[1].split(",")]
    print("type N K rows: ms per build (" + ", ".join(sys.argv[1].split(",")) + ")")
    for shape in sys.argv[2:]:
        name, N, K = shape.split(":")
        N, K, t = int(N), int(K), TYPES[name]
        p = pack(decode(name, quantize(torch.randn(N, K), name), K))
        for M in (1, 4, 8, 16):
            x = torch.randn(M, K)
            times, outs = [[] for _ in mods], []
            for rep in range(40):
                for i, mod in enumerate(mods):
                    t0 = time.perf_counter()
                    y = mod.qmm(x, p["q"], p["sc"], p["mn"], p["D"], p["Dm"], N, t.SB, t.GS, t.bits, t.mn_scale, None)
                    times[i].append(time.perf_counter() - t0)
                    if rep == 0:
                        outs.append(y)
            same = all(torch.equal(outs[0], y) for y in outs)
            print(name, N, K, f"M={M}", " ".join(f"{sorted(r)[len(r) // 2] * 1e3:.3f}" for r in times),
                  "same bits" if same else "DIFFERENT BITS", flush=True)


if __name__ == "__main__":
    main()
