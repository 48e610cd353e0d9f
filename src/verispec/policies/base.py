"""The draft-length policy interface (the engine's "adapt" stage)."""

from __future__ import annotations

import torch

from verispec.types import Draft, VerifyResult


class DraftPolicy:
    """Chooses the draft length before a round and may stop drafting early inside it.

    next_gamma(): the most tokens to draft this round (the engine also caps it by the remaining budget).
    keep_drafting(i, q_i): called after draft token i was sampled from q_i (None for deterministic drafters);
        return False to stop after it. Per-token policies (confidence, entropy) live here.
    update(draft, result): learn from the outcome of a round.
    record(): a small dict stored in the step statistics.
    """

    name = "base"

    def next_gamma(self) -> int:
        raise NotImplementedError

    def keep_drafting(self, i: int, q_i: torch.Tensor | None) -> bool:
        return True

    def update(self, draft: Draft, result: VerifyResult) -> None:
        pass

    def record(self) -> dict:
        return {}
