"""Fixed draft length γ, as in Leviathan et al. 2023 and Chen et al. 2023 (the baseline policy)."""

from __future__ import annotations

from verispec.policies.base import DraftPolicy
from verispec.validate import check_int


class FixedGamma(DraftPolicy):
    name = "fixed"

    def __init__(self, gamma: int = 4):
        self.gamma = check_int("gamma", gamma, 1)

    def next_gamma(self) -> int:
        return self.gamma
