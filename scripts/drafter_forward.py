"""What the fused projections, the lean forward and our q4 kernel buy a drafter: T(1) and T(2) of the 0.5B drafter's
forward on a warm 150-token cache, through transformers' forward and through `verispec.rewrites.lean`, with q/k/v
and gate/up separate and fused, and (on "fast-int4") on PyTorch's int4 kernel ("aten") and on ours ("q4",
`verispec.kernels.q4kernel`, where this machine builds it).
Usage: python scripts/drafter_forward.py [backend [rounds]]   (default: fast-int4, 3 rounds)

All copies of the drafter are held at once and timed in alternating rounds (medians of 7 timed forwards each), so
a change in the machine's speed during the run hits every variant alike. Prints one line per variant and round.
"""

from __future__ import annotations

import sys
from unittest import mock

import verispec
from verispec.backends import apply_backend
from verispec.kernels import int4 as int4_mod
from verispec.allocator import tune_allocator
from verispec.bench.measure import forward_cost_curve
from verispec.kernels.q4kernel import q4_kernel


def main(backend: str = "fast-int4", rounds: int = 3) -> None:
    tune_allocator()  # as the `verispec` command does
    kernels = ["aten"] + (["q4"] if backend == "fast-int4" and q4_kernel() is not None else [])
    models = {}
    for kernel in kernels:
        for fuse in (False, True):
            loaded = verispec.load_model("qwen2.5-coder-0.5b", backend="torch")
            with mock.patch.object(int4_mod, "q4_kernel", q4_kernel if kernel == "q4" else lambda: None):
                model = apply_backend(loaded, backend, fuse=fuse).model
            models[f"{kernel if backend == 'fast-int4' else '-'} {'fused' if fuse else 'separate'}"] = model
    for r in range(rounds):
        for name, model in models.items():
            for lean in (False, True):
                c = forward_cost_curve(model, ks=(1, 2), repeats=7, warmup=2, lean=lean)
                path = "lean        " if lean else "transformers"
                print(f"round {r}  {backend}  {name:13s}  {path}  T(1) {c[1]:5.1f} ms  T(2) {c[2]:5.1f} ms", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fast-int4", int(sys.argv[2]) if len(sys.argv) > 2 else 3)
