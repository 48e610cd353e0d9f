"""HF transformers' heuristic draft-length schedule (AssistedCandidateGenerator, num_assistant_tokens_schedule=
"heuristic"): γ += 2 after a fully accepted block, γ −= 1 (not below 1) otherwise."""

from __future__ import annotations

from verispec.policies.base import DraftPolicy
from verispec.validate import check_int


class Heuristic(DraftPolicy):
    name = "heuristic"

    def __init__(self, gamma: int = 4, gamma_max: int = 32):
        self.gamma0 = check_int("gamma", gamma, 1)
        self.gamma_max = check_int("gamma_max", gamma_max, 1)

    def start(self, sampling, vocab_size):
        self.gamma = self.gamma0

    def next_gamma(self) -> int:
        return self.gamma

    def update(self, draft, result):
        if not len(draft):
            return
        if result.accepted == len(draft):
            self.gamma = min(self.gamma_max, self.gamma + 2)
        else:
            self.gamma = max(1, self.gamma - 1)

    def record(self) -> dict:
        return {"gamma": self.gamma}
