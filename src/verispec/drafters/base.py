"""The drafter interface (the engine's "propose" stage), after HF's CandidateGenerator and vLLM's proposers.

A drafter sees the committed tokens, proposes up to `gamma` tokens with the exact distributions it sampled them
from (or None when it is deterministic), and is told the outcome so it can roll back or learn. New methods
(n-gram, retrieval, trees, trained heads) are new subclasses in their own file; the engine is not edited.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from verispec.policies.base import DraftPolicy
from verispec.sampling import Sampling
from verispec.types import Draft, VerifyResult


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

    wants_target_logits = False  # True: the engine calls `learn` every round (drafters that adapt online)

    def learn(self, draft: Draft, logits: torch.Tensor, result: VerifyResult) -> None:
        """Called before `commit`, when `wants_target_logits`, with the target's raw (K+1, V) logits at the pending
        token and the K draft nodes (row i predicts the token after the pending token and drafts 0..i-1)."""

    # Target features (`verispec.features`): names of the target hidden states this drafter reads ("final", or the
    # input of layer i). The engine then calls `take_features` after the prefill and after every round with the
    # (N, F) features of the N committed positions the target has cached (all but the pending token).
    target_features: tuple = ()

    def take_features(self, features: torch.Tensor) -> None:
        """Receive the target's features of the committed positions (row i: after tokens[:i + 1])."""

    # The batched engine (`verispec.batch`) calls these class methods with every running sequence's drafter of
    # this class. The defaults loop; a drafter whose work is a model forward overrides them to share one forward.
    @classmethod
    def prefill_batch(cls, drafters: list["Drafter"], token_lists: list[list[int]]) -> None:
        for d, tokens in zip(drafters, token_lists):
            d.prefill(tokens)

    @classmethod
    def propose_batch(cls, drafters: list["Drafter"], token_lists: list[list[int]], gammas: list[int],
                      policies: list[DraftPolicy], samplings: list[Sampling],
                      generators: list[torch.Generator | None]) -> list[Draft]:
        return [d.propose(t, g, p, s, r) for d, t, g, p, s, r in zip(drafters, token_lists, gammas, policies,
                                                                     samplings, generators)]


class ModelDrafter(Drafter):
    """A drafter that runs a draft model through `self.lm` (a CachedLM): its forward counters, prefill and the
    cache rollback after each round (the KV entries of rejected drafts, or of a tree's other nodes, are dropped)."""

    lm = None

    @property
    def forwards(self) -> int:
        return self.lm.forwards - self.prefill_forwards

    @property
    def tokens_processed(self) -> int:
        return self.lm.tokens_processed

    def prefill(self, tokens):
        self.lm.reset()
        self.lm.prefill(tokens[:-1])
        self.prefill_forwards = self.lm.forwards

    @classmethod
    def prefill_batch(cls, drafters, token_lists):
        from verispec.cache import prefill_batch

        if cls.prefill is not ModelDrafter.prefill:  # a subclass with its own prefill keeps it
            return super().prefill_batch(drafters, token_lists)
        for d in drafters:
            d.lm.reset()
        prefill_batch([d.lm for d in drafters], [t[:-1] for t in token_lists])
        for d in drafters:
            d.prefill_forwards = d.lm.forwards

    def commit(self, tokens, draft, result):
        self.lm.rollback(tokens)


Step = tuple[int, "torch.Tensor | None", "torch.Tensor | None"]  # (token, q it was sampled from, raw logits)


def bounded_chain(steps: Iterator[Step], gamma: int, policy: DraftPolicy, stop_ids: frozenset[int]
                  ) -> tuple[list[int], list[torch.Tensor]]:
    """The one place where a chain's length is decided: take draft tokens from `steps` until γ are drafted, a stop
    token is drafted (nothing after it could be kept), or the policy says stop. Steps are pulled lazily, so a
    drafter computes (a draft-model forward, a lookup) only the tokens that are used. A step is (token, q, logits):
    q is the distribution the token was sampled from (None for deterministic drafters), logits the drafter's raw
    logits where it has them (entropy-reading policies use them under greedy decoding).
    Returns the tokens and the q rows of the steps that had one."""
    x: list[int] = []
    qs: list[torch.Tensor] = []
    for i, (t, q, logits) in zip(range(gamma), steps):  # range first: no step is computed beyond γ
        x.append(t)
        if q is not None:
            qs.append(q)
        if not chain_goes_on(i, t, q, logits, policy, stop_ids):
            break
    return x, qs


def chain_goes_on(i: int, t: int, q, logits, policy: DraftPolicy, stop_ids: frozenset[int]) -> bool:
    """After draft token i (t, drawn from q): may the chain go on (γ aside)? Not after a stop token, nor when the
    policy says stop (its keep_drafting is asked at every step, as `bounded_chain` asks it)."""
    return t not in stop_ids and policy.keep_drafting(i, q, logits)


class NoDrafter(Drafter):
    """Autoregressive decoding is the engine with an empty draft: one target forward, one bonus token."""

    name = "none"

    @classmethod
    def from_ctx(cls, ctx) -> "NoDrafter":
        return cls()

    def propose(self, tokens, gamma, policy, sampling, generator) -> Draft:
        return Draft([], None, self.name)
