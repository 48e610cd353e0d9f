"""The speculative-decoding metrics, defined once, in the words of the field (Leviathan et al. 2023; vLLM's
spec_decode): *accepted* tokens are drafts kept, the *recovered* token is sampled from the residual at the first
rejection, the *bonus* token is sampled from the target when every draft was accepted.

From per-round counts — how many tokens each target forward's round drafted (d) and how many of them it kept (a);
every round adds exactly one recovered or bonus token:

- acceptance rate α̂ = Σa / Σd
- MAT (mean accepted tokens per target forward) = (Σa + rounds) / rounds, always ≥ 1
- γ used = Σd / rounds, and its histogram
- acceptance by position i = #(rounds with a > i) / #(rounds with d > i)

`GenerationStats.summary()` (one generation) and the benchmark's aggregate (many) both call `speculative()`, so a
metric added here appears in both.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def acceptance_by_position(drafted: Sequence[int], accepted: Sequence[int]) -> list[tuple[int, int]]:
    """Per draft position i: (#rounds that drafted a token at i, #rounds that kept it)."""
    width = max(drafted, default=0)
    return [(sum(1 for d in drafted if d > i), sum(1 for a in accepted if a > i)) for i in range(width)]


def speculative(drafted: Sequence[int], accepted: Sequence[int]) -> dict:
    """Every speculative metric of a set of rounds (the rounds of one generation, or of many)."""
    rounds, D, A = len(drafted), sum(drafted), sum(accepted)
    return {
        "steps": rounds,
        "drafted": D,
        "accepted": A,
        "acceptance_rate": A / D if D else None,
        "mat": (A + rounds) / rounds if rounds else None,
        "mean_gamma": D / rounds if rounds else None,
        "gamma_histogram": {str(k): v for k, v in sorted(Counter(drafted).items())},
        "acceptance_by_position": [k / n if n else None for n, k in acceptance_by_position(drafted, accepted)],
    }
