"""Fixed draft length γ, as in Leviathan et al. 2023 and Chen et al. 2023 (the baseline policy)."""

from __future__ import annotations

from verispec.policies.base import DraftPolicy


class FixedGamma(DraftPolicy):
    name = "fixed"

    def __init__(self, gamma: int = 4):
        if not isinstance(gamma, int) or isinstance(gamma, bool) or gamma < 1:
            raise ValueError(f"gamma must be an integer >= 1, got {gamma!r}")
        self.gamma = gamma

    def next_gamma(self) -> int:
        return self.gamma
