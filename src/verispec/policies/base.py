"""The draft-length policy interface (the engine's "adapt" stage)."""

from __future__ import annotations

import torch

from verispec.sampling import Sampling
from verispec.types import Draft, VerifyResult


class DraftPolicy:
    """Chooses the draft length before a round and may stop drafting early inside it.

    start(sampling, vocab_size): called by the engine at the start of every generation (reset state here).
    next_gamma(): the most tokens to draft this round (the engine also caps it by the remaining budget).
    keep_drafting(i, q_i, logits_i): called after draft token i was sampled from q_i (the sampling distribution;
        None for deterministic drafters) with the drafter's raw logits_i when it has them; return False to stop.
    update(draft, result): learn from the outcome of a round.
    observe_costs(draft, t_draft, t_verify, t_other): the round's measured wall times (for cost-aware policies).
    record(): a small dict stored in this round's step statistics.
    A policy only changes how many tokens are drafted, never which distribution they come from, so every policy
    leaves the output distribution exactly the target's.
    """

    name = "base"

    def start(self, sampling: Sampling, vocab_size: int) -> None:
        pass

    def next_gamma(self) -> int:
        raise NotImplementedError

    def keep_drafting(self, i: int, q_i: torch.Tensor | None, logits_i: torch.Tensor | None = None) -> bool:
        return True

    def update(self, draft: Draft, result: VerifyResult) -> None:
        pass

    def observe_costs(self, draft: Draft, t_draft: float, t_verify: float, t_other: float) -> None:
        """The round's measured seconds (drafting; target forward + verification; the rest), after update()."""

    def record(self) -> dict:
        return {}

