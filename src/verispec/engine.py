"""The speculative decoding loop: propose -> score -> verify -> commit -> adapt -> record.

One target forward per round scores the pending token plus the K drafts (a chain, or a token tree with its own
mask and positions; the target cache holds every committed token except the last). Side nodes a drafter asks to be
scored in the same forward (Lookahead's window) are handed back to it unverified. Autoregressive decoding is the
same loop with an empty draft, so every method's tokens are produced and counted by the same code.
"""

from __future__ import annotations

import time

import torch

from verispec.cache import CachedLM
from verispec.drafters.base import Drafter
from verispec.policies.base import DraftPolicy
from verispec.sampling import Sampling
from verispec.types import GenerationStats, StepStats


def decode(target: CachedLM, drafter: Drafter, verifier, policy: DraftPolicy, prompt: list[int], *,
           max_new_tokens: int, sampling: Sampling, stop_ids: frozenset[int], method: str,
           generator: torch.Generator | None = None) -> tuple[list[int], GenerationStats]:
    """Generate up to max_new_tokens after `prompt`; returns (new token ids, statistics)."""
    stats = GenerationStats(method=method, prompt_tokens=len(prompt))
    policy.start(sampling, target.vocab_size)
    t_start = time.perf_counter()
    tokens = list(prompt)
    if drafter.target_features:  # drafters on the target's hidden states (Medusa, EAGLE): the cache keeps them
        target.track_features(drafter.target_features)
    target.reset()
    target.prefill(tokens[:-1])  # the last prompt token is fed with the first draft
    feed_features(target, drafter, tokens)
    drafter.prefill(tokens)
    stats.t_prefill = time.perf_counter() - t_start
    stop_reason = "max_new_tokens"
    while len(tokens) - len(prompt) < max_new_tokens:
        t0 = time.perf_counter()
        budget = max_new_tokens - (len(tokens) - len(prompt))
        draft = drafter.propose(tokens, min(policy.next_gamma(), budget - 1), policy, sampling, generator)
        t1 = time.perf_counter()
        logits = target.score(tokens, draft)  # (1 + K + S, V): pending token, K draft nodes, S side nodes
        if settle(target, drafter, verifier, policy, tokens, draft, logits, budget, sampling, stop_ids, generator,
                  stats, t0, t1):
            stop_reason = "stop_token"
            break
    finish(stats, target, drafter, len(prompt), len(tokens), stop_reason, t_start)
    return tokens[len(prompt):], stats


def settle(target: CachedLM, drafter: Drafter, verifier, policy: DraftPolicy, tokens: list[int], draft,
           logits: torch.Tensor, budget: int, sampling: Sampling, stop_ids: frozenset[int],
           generator: torch.Generator | None, stats: GenerationStats, t0: float, t1: float) -> bool:
    """Verify one scored round, commit its tokens to `tokens`, roll both caches back, tell drafter and policy,
    record the step; True when a stop token was emitted. (The batched engine settles each sequence with this.)"""
    p = sampling.probs(logits[: len(draft.tokens) + 1])  # (K+1, V)
    result = verifier.verify(draft, p, generator)
    t2 = time.perf_counter()
    new = result.emitted(draft)[:budget]
    hit = next((i for i, t in enumerate(new) if t in stop_ids), None)
    if hit is not None:
        new = new[: hit + 1]
    tokens.extend(new)
    target.rollback(tokens)  # the target cache keeps only committed tokens
    feed_features(target, drafter, tokens)
    if draft.side_tokens:
        drafter.observe(draft, logits[len(draft.tokens) + 1:])  # (S, V)
    if drafter.wants_target_logits:  # a drafter that learns online (OSD) reads the target's verified logits
        drafter.learn(draft, logits[: len(draft.tokens) + 1], result)  # (K+1, V)
    drafter.commit(tokens, draft, result)
    policy.update(draft, result)
    t3 = time.perf_counter()
    policy.observe_costs(draft, t1 - t0, t2 - t1, t3 - t2)  # measured costs, for the next rounds' choices
    stats.steps.append(StepStats(len(draft), result.accepted, result.kind, len(new), t1 - t0, t2 - t1,
                                 t3 - t2, draft.source, policy.record(), nodes=len(draft.tokens)))
    return hit is not None


def feed_features(target: CachedLM, drafter: Drafter, tokens: list[int]) -> None:
    """Hand a drafter that reads the target's hidden states those of every committed position but the pending one
    (the cache may hold the pending token too, when a draft node happened to carry it: its row is not handed over)."""
    if drafter.target_features:
        drafter.take_features(target.features[: len(tokens) - 1])  # (len(tokens) - 1, F)


def finish(stats: GenerationStats, target: CachedLM, drafter: Drafter, n_prompt: int, n_tokens: int,
           stop_reason: str, t_start: float) -> None:
    """The generation's totals, from the forward counters (and the target's feature hooks removed)."""
    target.untrack_features()
    stats.t_total = time.perf_counter() - t_start
    stats.new_tokens = n_tokens - n_prompt
    stats.target_prefill_forwards = 1 if n_prompt > 1 else 0
    stats.target_forwards = target.forwards - stats.target_prefill_forwards
    stats.target_tokens_processed = target.tokens_processed
    stats.drafter_forwards = drafter.forwards
    stats.drafter_prefill_forwards = drafter.prefill_forwards
    stats.drafter_tokens_processed = drafter.tokens_processed
    stats.stop_reason = stop_reason
