"""Typical acceptance — LOSSY: Medusa's relaxed verification (Cai et al. 2024, Sec. 2.3.1).

A draft token x at a position is accepted when the target gives it enough probability relative to how uncertain
the target is there: p(x) > min(ε, δ · exp(−H(p))), ε = 0.09 and δ = 0.3 by default (Medusa's). It accepts more
than rejection sampling and does NOT keep the target's distribution: outputs under sampling differ in law from the
target's, which is why it is registered as `typical-lossy` and every report names it so. Under greedy decoding p is
one-hot and the rule reduces to "accept the argmax", i.e. it is exact there.

For a token tree the children of a node are tried in order, the first that passes is kept (Medusa keeps the longest
accepted candidate; walking the first passing child is the same on chains and close on trees). After the last
accepted token the next one is drawn from p there.
"""

from __future__ import annotations

import math

import torch

from verispec.sampling import sample
from verispec.types import Draft, VerifyResult


class TypicalVerifier:
    name = "typical-lossy"
    lossless = False

    def __init__(self, epsilon: float = 0.09, delta: float = 0.3):
        if not (0 < epsilon <= 1 and 0 < delta):
            raise ValueError(f"typical acceptance needs 0 < epsilon <= 1 and delta > 0; got {epsilon}, {delta}")
        self.epsilon, self.delta = epsilon, delta

    def threshold(self, p: torch.Tensor) -> float:
        """min(ε, δ·exp(−H(p))) for one (V,) distribution."""
        pd = p.double()
        h = float(-(pd[pd > 0] * pd[pd > 0].log()).sum())
        return min(self.epsilon, self.delta * math.exp(-h))

    def verify(self, draft: Draft, p: torch.Tensor, generator: torch.Generator | None) -> VerifyResult:
        """p: (1 + K, V) target probabilities at the pending token and at each draft node."""
        children: dict[int, list[int]] = {}
        for i, a in enumerate(draft.node_parents()[:len(draft.tokens)]):
            children.setdefault(a, []).append(i)
        at, path = -1, []
        while True:
            row = p[at + 1]  # (V,)
            cut = self.threshold(row)
            kept = next((c for c in children.get(at, []) if float(row[draft.tokens[c]]) > cut), None)
            if kept is None:
                kind = "recovered" if children.get(at) else "bonus"
                return VerifyResult(len(path), sample(row, generator), kind,
                                    path if draft.parents is not None else None)
            at = kept
            path.append(at)
