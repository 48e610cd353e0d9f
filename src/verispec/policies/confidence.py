"""Confidence-threshold stopping (the idea of HF's assistant_confidence_threshold): stop drafting once the
drafter's top probability for the current draft token falls below a threshold."""

from __future__ import annotations

from verispec.policies.base import DraftPolicy
from verispec.validate import check_int, check_unit
from verispec.policies.entropy import drafter_distribution


class Confidence(DraftPolicy):
    name = "confidence"

    def __init__(self, threshold: float = 0.4, gamma_max: int = 8, consistent: bool = True):
        self.threshold = check_unit("threshold", threshold)
        self.gamma_max = check_int("gamma_max", gamma_max, 1)
        self.consistent = bool(consistent)
        self.sampling = None

    def start(self, sampling, vocab_size):
        self.sampling = sampling

    def next_gamma(self) -> int:
        return self.gamma_max

    def keep_drafting(self, i, q_i, logits_i=None) -> bool:
        p = drafter_distribution(q_i, logits_i, self.sampling, self.consistent)
        return p is None or float(p.max()) >= self.threshold
