"""Where a drafted token's time goes in one real SD generation: the drafter's forward, its sampling transform, and
the rest of `DraftModelDrafter.propose`. Usage: python scripts/profile_draft_cost.py [max_new_tokens [drafter_backend]]

Wraps `CachedLM.forward` and `Sampling.probs` with timers for the drafter only; prints ms per drafted token.
"""

from __future__ import annotations

import sys
import time

import verispec
from verispec.cache import CachedLM
from verispec.sampling import Sampling

PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'


def main(n: int = 64) -> None:
    from verispec.allocator import tune_allocator

    tune_allocator()  # as the `verispec` command does
    target = verispec.load_model("qwen2.5-coder-1.5b")
    drafter = verispec.load_model("qwen2.5-coder-0.5b", backend=sys.argv[2] if len(sys.argv) > 2 else "fast-int4")
    spent = {"forward": 0.0, "probs": 0.0}
    forward, probs = CachedLM.forward, Sampling.probs

    def timed_forward(self, *a, **k):
        t0 = time.perf_counter()
        out = forward(self, *a, **k)
        if self.model is drafter.model:
            spent["forward"] += time.perf_counter() - t0
        return out

    def timed_probs(self, logits):
        t0 = time.perf_counter()
        out = probs(self, logits)
        if logits.shape[0] == 1:  # the drafter's one-row calls (the target scores K + 1 rows)
            spent["probs"] += time.perf_counter() - t0
        return out

    CachedLM.forward, Sampling.probs = timed_forward, timed_probs
    verispec.generate(target, PROMPT, drafter=drafter, max_new_tokens=8)  # warm-up
    spent.update(forward=0.0, probs=0.0)
    s = verispec.generate(target, PROMPT, drafter=drafter, max_new_tokens=n).stats
    per = {k: 1000 * v / s.drafted for k, v in spent.items()}
    total = 1000 * s.t_draft / s.drafted
    print(f"{s.drafted} drafted tokens; ms per drafted token: total {total:.1f} = forward {per['forward']:.1f} "
          f"+ sampling {per['probs']:.1f} + other {total - per['forward'] - per['probs']:.1f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 64)
