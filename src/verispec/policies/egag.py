"""EGAG: entropy-guided adaptive γ (this project's method; no training).

A fixed γ wastes drafts on hard tokens and drafts too few on easy ones. EGAG reads the drafter's uncertainty:
H_norm = H(q) / log V, and sets the block length γ = ⌊(1 − H_norm) · γ_max⌋ clamped to [γ_min, γ_max].

Variants (all options of one policy):
- mode="block": γ for the round is set from H_norm of the round's first draft distribution.
- mode="token": keep drafting (up to γ_max) until the current draft token's H_norm exceeds `threshold`.
- ema: smooth H_norm across rounds, H̄ ← ema · H̄ + (1 − ema) · H_norm (0 = off).
- consistent: measure entropy at the sampling temperature actually used (see entropy.drafter_distribution).
Records per round: H_norm (of the first draft token, as used), γ chosen; the engine records accepted counts.
"""

from __future__ import annotations

import math

from verispec.policies.base import DraftPolicy
from verispec.validate import check_int, check_unit
from verispec.policies.entropy import drafter_distribution, normalised_entropy


class EGAG(DraftPolicy):
    name = "egag"

    def __init__(self, gamma_max: int = 8, gamma_min: int = 1, mode: str = "block", ema: float = 0.0,
                 consistent: bool = True, threshold: float = 0.3):
        self.gamma_max = check_int("gamma_max", gamma_max, 1)
        self.gamma_min = check_int("gamma_min", gamma_min, 1)
        if gamma_min > gamma_max:
            raise ValueError(f"gamma_min ({gamma_min}) must be <= gamma_max ({gamma_max})")
        if mode not in ("block", "token"):
            raise ValueError(f"mode must be 'block' or 'token', got {mode!r}")
        self.mode, self.consistent = mode, bool(consistent)
        self.ema = check_unit("ema", ema, hi_open=True)
        self.threshold = check_unit("threshold", threshold)
        self.sampling, self.V = None, 2

    def start(self, sampling, vocab_size):
        self.sampling, self.V = sampling, vocab_size
        self.h_bar: float | None = None
        self.gamma_block = self.gamma_max
        self._rec: dict = {}

    def next_gamma(self) -> int:
        return self.gamma_max

    def gamma_from(self, h_norm: float) -> int:
        # The tolerance keeps fp32 entropy round-off (H_norm = 0.5000001) from losing a whole draft token.
        return min(self.gamma_max, max(self.gamma_min, math.floor((1 - h_norm) * self.gamma_max + 1e-6)))

    def keep_drafting(self, i, q_i, logits_i=None) -> bool:
        p = drafter_distribution(q_i, logits_i, self.sampling, self.consistent)
        if p is None:  # deterministic drafter without a distribution: nothing to read
            return True
        h = normalised_entropy(p, self.V)
        if self.mode == "token":
            if i == 0:
                self._rec = {"h_norm": h}
            n = i + 1
            self._rec["gamma"] = n
            return h <= self.threshold and n < self.gamma_max
        if i == 0:
            self.h_bar = h if self.h_bar is None or not self.ema else self.ema * self.h_bar + (1 - self.ema) * h
            self.gamma_block = self.gamma_from(self.h_bar)
            self._rec = {"h_norm": h, "h_used": self.h_bar, "gamma": self.gamma_block}
        return i + 1 < self.gamma_block

    def record(self) -> dict:
        r, self._rec = self._rec, {}
        return r
