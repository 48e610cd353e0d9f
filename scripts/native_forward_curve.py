"""The target's forward time T(k) on the gguf backend, k = 1, 2, 4, 8, 16 new tokens after a 300-token context:
`NativeDecoder` plus the output layer, best of 5, and (with --prof) where one forward's time goes by kernel (on the
Python layer loop: `VERISPEC_NO_STEP=1` for the curve too gives that loop's T(k)).

Usage: python scripts/native_forward_curve.py [--model qwen2.5-coder-1.5b] [--prof]
"""

from __future__ import annotations

import argparse
import collections
import os
import time

import torch
from transformers import DynamicCache

import verispec
import verispec.kernels.native as KN
from verispec.backends.native import NativeDecoder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--prof", action="store_true")
    a = ap.parse_args()
    m = verispec.load_model(a.model, backend="gguf").model
    dec = NativeDecoder(m)
    ctx = torch.randint(100, 20000, (1, 300))

    def once(T: int, after_prefill=lambda: None) -> float:
        c = DynamicCache(config=m.config)
        dec(ctx, c)
        after_prefill()
        x = torch.randint(100, 20000, (1, T))
        t0 = time.perf_counter()
        m.lm_head(dec(x, c, n_last=T))
        return time.perf_counter() - t0

    ks = (1, 2, 4, 8, 16)
    for k in ks:
        once(k)  # warm-up
    t = {k: 1000 * min(once(k) for _ in range(5)) for k in ks}
    print(f"path {KN.native_path()}; T(k) ms: " + ", ".join(f"{k}: {v:.1f}" for k, v in t.items())
          + f"; T(8)/T(1) {t[8] / t[1]:.2f}, T(16)/T(1) {t[16] / t[1]:.2f}")
    if a.prof:  # per kernel: the Python layer loop (the C++ one, verispec.backends.step, is one opaque call)
        os.environ["VERISPEC_NO_STEP"] = "1"
        dec._step = None
        path, mod = KN.kernels()
        spent, calls = collections.Counter(), collections.Counter()

        class Timed:
            def __getattr__(self, name):
                f = getattr(mod, name)

                def g(*args, **kw):
                    t0 = time.perf_counter()
                    r = f(*args, **kw)
                    spent[name] += time.perf_counter() - t0
                    calls[name] += 1
                    return r
                return g

        KN.kernels = lambda: (path, Timed())
        for k in (1, 8, 16):
            once(k)
            total = once(k, lambda: (spent.clear(), calls.clear()))
            parts = ", ".join(f"{n} {1000 * v:.1f} ms / {calls[n]} calls" for n, v in spent.most_common())
            print(f"k={k}: {1000 * total:.1f} ms : {parts}; "
                  f"other {1000 * (total - sum(spent.values())):.1f} ms")


if __name__ == "__main__":
    main()
