"""One linear layer's time on the native kernel paths that run here, per row count: the vpdpbusd code against the AMX
tiles (on the avx512_amx path), checking that both give the same bits.

Usage: python scripts/qmm_paths.py [--threads 2]   (shapes of the 1.5B target: gate/up Q4_K, down Q6_K)
"""

from __future__ import annotations

import argparse
import time

import torch

from verispec.kernels import native
from verispec.kernels.ggml_blocks import TYPES, decode, pack, quantize


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    path, mod = native.kernels()
    if mod is None:
        raise SystemExit("no compiled kernel path here (torch path only)")
    amx = mod.amx_rows(-1) >= 0
    print(f"path {path}, {a.threads} threads; median of 20 calls")
    for name, (N, K) in [("Q4_K", (8960, 1536)), ("Q6_K", (1536, 8960))]:
        t = TYPES[name]
        p = pack(decode(name, quantize(torch.randn(N, K), name), K))
        for M in (1, 2, 4, 8, 9, 16):
            x = torch.randn(M, K)
            res = {}
            for label, rows in (("vpdpbusd", 10 ** 6), ("amx", 1)) if amx else (("vpdpbusd", None),):
                if rows is not None:
                    before = mod.amx_rows(-1)
                    mod.amx_rows(rows)
                f = lambda: mod.qmm(x, p["q"], p["sc"], p["mn"], p["D"], p["Dm"], N, t.SB, t.GS, t.bits,
                                    t.mn_scale, None)
                y = f()
                ts = []
                for _ in range(20):
                    t0 = time.perf_counter()
                    f()
                    ts.append(time.perf_counter() - t0)
                res[label] = (sorted(ts)[10] * 1e3, y)
                if rows is not None:
                    mod.amx_rows(before)
            same = all(torch.equal(v[1], res["vpdpbusd"][1]) for v in res.values())
            cells = ", ".join(f"{k} {v[0]:.3f} ms" for k, v in res.items())
            print(f"{name} {N}x{K} M={M}: {cells}{'' if same else '  BITS DIFFER'}")


if __name__ == "__main__":
    main()
