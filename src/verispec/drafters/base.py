"""The drafter interface (the engine's "propose" stage), after HF's CandidateGenerator and vLLM's proposers.

A drafter sees the committed tokens, proposes up to `gamma` tokens with the exact distributions it sampled them
from (or None when it is deterministic), and is told the outcome so it can roll back or learn. New methods
(n-gram, retrieval, trees, trained heads) are new subclasses in their own file; the engine is not edited.
"""

from __future__ import annotations

import torch

from verispec.policies.base import DraftPolicy
from verispec.sampling import Sampling
from verispec.types import Draft, VerifyResult
from verispec.validate import check_known


class Drafter:
    name = "base"
    forwards = 0  # decode forwards of a draft model, if any
    prefill_forwards = 0
    tokens_processed = 0

    def prefill(self, tokens: list[int]) -> None:
        """Called once with the prompt before the first round."""

    def propose(self, tokens: list[int], gamma: int, policy: DraftPolicy, sampling: Sampling,
                generator: torch.Generator | None) -> Draft:
        raise NotImplementedError

    def observe(self, draft: Draft, side_logits: torch.Tensor) -> None:
        """Called with the target's (S, V) logits at the draft's side nodes, when it asked for any."""

    def commit(self, tokens: list[int], draft: Draft, result: VerifyResult) -> None:
        """Called after the round with the committed tokens (prompt + all output so far)."""


class NoDrafter(Drafter):
    """Autoregressive decoding is the engine with an empty draft: one target forward, one bonus token."""

    name = "none"

    @classmethod
    def from_ctx(cls, ctx) -> "NoDrafter":
        check_known(ctx.options, "ar", ())
        return cls()

    def propose(self, tokens, gamma, policy, sampling, generator) -> Draft:
        return Draft([], None, self.name)
