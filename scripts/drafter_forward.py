"""What the fused projections and the lean forward buy a drafter: T(1) and T(2) of the 0.5B drafter's forward on a
warm 150-token cache, through transformers' forward and through `verispec.backends.lean`, with q/k/v and gate/up
separate and fused. Usage: python scripts/drafter_forward.py [backend [rounds]]   (default: fast-int4, 3 rounds)

Both copies of the drafter are held at once and timed in alternating rounds (medians of 7 timed forwards each), so
a change in the machine's speed during the run hits every variant alike. Prints one line per variant and round.
"""

from __future__ import annotations

import sys

import verispec
from verispec.backends import apply_backend
from verispec.backends.allocator import tune_allocator
from verispec.backends.measure import forward_cost_curve


def main(backend: str = "fast-int4", rounds: int = 3) -> None:
    tune_allocator()  # as the `verispec` command does
    models = {}
    for fuse in (False, True):
        loaded = verispec.load_model("qwen2.5-coder-0.5b", backend="torch")
        models["fused" if fuse else "separate"] = apply_backend(loaded, backend, fuse=fuse).model
    for r in range(rounds):
        for name, model in models.items():
            for lean in (False, True):
                c = forward_cost_curve(model, ks=(1, 2), repeats=7, warmup=2, lean=lean)
                path = "lean        " if lean else "transformers"
                print(f"round {r}  {backend}  {name:8s}  {path}  T(1) {c[1]:5.1f} ms  T(2) {c[2]:5.1f} ms", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fast-int4", int(sys.argv[2]) if len(sys.argv) > 2 else 3)
