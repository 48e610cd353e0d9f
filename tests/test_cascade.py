"""Cascade drafting (`verispec.drafters.cascade`): the inner rule keeps the draft model's law, a wrong inner drafter
changes nothing but speed, the horizontal cascade's positions are one-hot, bad options are refused. (Greedy equality
and the end-to-end χ² run through the contract suite.)"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import verispec
from verispec.drafters import cascade
from verispec.drafters.base import Drafter
from verispec.drafters.cascade import CascadeDrafter, speculated_steps
from verispec.drafters.draft_model import DraftModelDrafter
from verispec.policies import FixedGamma
from verispec.sampling import Sampling
from verispec.types import Draft
from tests.conftest import tiny_llama
from tests.law import chi2_pvalue, probs
from tests.test_contract import GREEDY_PROMPT, noisy_copy


class Fixed(Drafter):
    """An inner drafter that always proposes the same tokens (mostly wrong)."""

    def __init__(self, tokens):
        self.tokens = tokens

    def propose(self, tokens, gamma, policy, sampling, generator):
        return Draft(self.tokens[:gamma], None, "fixed")


def pair_law(model, prefix, sampling) -> np.ndarray:
    """The exact law of the draft model's next two tokens, (V * V,), from plain full forwards."""
    V = model.config.vocab_size
    with torch.no_grad():
        p1 = probs(model(torch.tensor([prefix])).logits[0, -1].numpy(), sampling.temperature)[0]  # (V,)
        law = np.zeros((V, V))
        for a in range(V):
            p2 = probs(model(torch.tensor([prefix + [a]])).logits[0, -1].numpy(), sampling.temperature)[0]
            law[a] = p1[a] * p2
    return law.reshape(-1)


def pair_counts(model, prefix, inner, n, sampling) -> np.ndarray:
    from verispec.cache import CachedLM

    V = model.config.vocab_size
    lm = CachedLM(model)
    counts = np.zeros(V * V)
    g = torch.Generator().manual_seed(7)
    for _ in range(n):
        steps = speculated_steps(lm, list(prefix), inner, 2, 2, sampling, g, [])
        (a, *_), (b, *_) = itertools.islice(steps, 2)
        counts[a * V + b] += 1
    return counts


@pytest.fixture(scope="module")
def small():
    return tiny_llama(4, seed=5, scale=1.5)


def test_inner_rule_keeps_the_draft_models_law(small):
    """Two tokens drafted through the inner rule with a fixed (often wrong) proposal follow q(x1) q(x2 | x1)."""
    s = Sampling(temperature=1.0)
    law = pair_law(small, [1, 2], s)
    counts = pair_counts(small, [1, 2], Fixed([0, 3]), 3000, s)
    assert chi2_pvalue(counts, law) > 1e-3


def test_inner_rule_negative_control(small, monkeypatch):
    """Resampling from q itself after a rejection (instead of the residual) over-weights the proposal: caught."""

    def wrong(q, t, generator):
        p_keep = float(q[t])
        if float(torch.rand((), generator=generator, dtype=torch.float64)) < p_keep:
            return t, True
        return cascade.sample(q, generator), False  # the bug: the rejected token may come back

    monkeypatch.setattr(cascade, "keep_or_resample", wrong)
    s = Sampling(temperature=1.0)
    law = pair_law(small, [1, 2], s)
    counts = pair_counts(small, [1, 2], Fixed([0, 3]), 3000, s)
    assert chi2_pvalue(counts, law) < 1e-3


def test_greedy_chain_is_the_draft_models_own_and_a_right_inner_saves_forwards():
    target = tiny_llama(64, seed=1, scale=20.0)
    drafter = noisy_copy(target, 0.6, 4)
    tokens = GREEDY_PROMPT * 2
    plain = DraftModelDrafter(drafter, 64)
    plain.prefill(tokens)
    want = plain.propose(tokens, 6, FixedGamma(6), Sampling(), None).tokens
    for inner in ("pld", "nasd", Fixed([1, 2, 3, 4, 5])):
        c = CascadeDrafter(drafter, 64, inner="pld" if not isinstance(inner, str) else inner)
        if not isinstance(inner, str):
            c.inner = inner  # a wrong inner drafter: the chain must not change
        c.prefill(tokens)
        assert c.propose(tokens, 6, FixedGamma(6), Sampling(), None).tokens == want
    c = CascadeDrafter(drafter, 64)
    c.inner = Fixed(want)  # an inner drafter that is always right: the six tokens cost one draft-model forward
    c.prefill(tokens)
    assert c.propose(tokens, 6, FixedGamma(6), Sampling(), None).tokens == want
    assert plain.forwards == 6 and c.forwards == 1


def test_horizontal_positions_are_one_hot():
    target = tiny_llama(64, seed=1, scale=20.0)
    c = CascadeDrafter(noisy_copy(target, 0.6, 4), 64, inner="none", horizontal=2, lower="pld")
    tokens = GREEDY_PROMPT * 2
    c.prefill(tokens)
    c.lower = Fixed([9, 8, 7, 6, 5])  # stands in for prompt lookup, which may find no match after sampled tokens
    d = c.propose(tokens, 6, FixedGamma(6), Sampling(temperature=1.0), torch.Generator().manual_seed(0))
    assert d.tokens[2:] == [9, 8, 7, 6] and d.q.shape == (6, 64)
    for i in range(2, len(d.tokens)):
        assert float(d.q[i, d.tokens[i]]) == 1.0 and float(d.q[i].sum()) == 1.0
    assert c.forwards == 2  # the model drafted only its two positions


def test_greedy_with_wrong_inner_matches_ar(monkeypatch):
    target = tiny_llama(64, seed=1, scale=20.0)
    drafter = noisy_copy(target, 0.6, 4)
    ar = verispec.generate(target, GREEDY_PROMPT, method="ar", max_new_tokens=32).token_ids
    monkeypatch.setattr(cascade, "statistical", lambda name, stop_ids: Fixed([7, 7, 7, 7]))
    out = verispec.generate(target, GREEDY_PROMPT, drafter=drafter, method="cascade", gamma=5, max_new_tokens=32,
                            horizontal=3)
    assert out.token_ids == ar


@pytest.mark.parametrize("opts", [{"inner": "bigram"}, {"horizontal": -1}, {"inner_gamma": 0},
                                  {"horizontal": 2, "lower": "model"}])
def test_bad_options_are_refused(opts):
    target = tiny_llama(64, seed=1)
    with pytest.raises(ValueError):
        verispec.generate(target, [1, 2, 3], drafter=tiny_llama(64, seed=2), method="cascade", max_new_tokens=4,
                          **opts)
