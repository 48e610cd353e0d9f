"""Hybrid NASD + draft model: source choice, greedy equality with AR, the drafter's KV cache, and a negative control
for its model rounds (its sampling law is in the contract suite, tests/test_contract.py)."""

from __future__ import annotations

import copy

import pytest
import torch

import verispec
from verispec.cache import CachedLM
from verispec.drafters.draft_model import DraftModelDrafter
from verispec.drafters.hybrid import HybridDrafter
from verispec.drafters.ngram import NGramDrafter
from verispec.engine import decode
from verispec.policies import FixedGamma
from verispec.sampling import Sampling
from verispec.types import Draft
from verispec.verifiers import RejectionVerifier
from tests import law
from tests.conftest import tiny_llama
from tests.test_distribution import V, models
from tests.test_ngram import GREEDY_PROMPT, T1, _Policy, ar, run


def hybrid(drafter_model, vocab, **opts) -> HybridDrafter:
    return HybridDrafter(NGramDrafter(**opts), DraftModelDrafter(drafter_model, vocab))


class _AnyPolicy(_Policy):
    def keep_drafting(self, i, q_i, logits_i=None):
        self.calls.append(i)
        return True


def test_confident_match_drafts_from_the_store_else_the_model():
    _, dm = models()
    h = hybrid(dm, V, min_context=2, min_count=2)
    tokens = [1, 5, 2, 7, 1, 5, 2, 6, 1, 5]  # (1, 5) -> 2 seen twice: confident
    h.prefill(tokens)
    d = h.propose(tokens, 3, _AnyPolicy(), T1, torch.Generator().manual_seed(0))
    assert d.source == "ngram" and d.q is None and d.tokens[0] == 2
    assert len(d.tokens) == 1  # (5, 2) -> {7, 6} once each: not confident, so the draft stops
    assert h.forwards == 0  # no draft-model forward was needed
    tokens = [1, 5, 2, 7, 1, 5, 2, 6, 4, 5]  # (4, 5) unseen, (5,) is too short: the model drafts
    h.prefill(tokens)
    d = h.propose(tokens, 3, _AnyPolicy(), T1, torch.Generator().manual_seed(0))
    assert d.source == "draft_model" and d.q.shape == (3, V) and h.forwards == 3
    assert torch.allclose(d.q.sum(-1), torch.ones(3)) and all(d.q[i, t] > 0 for i, t in enumerate(d.tokens))
    with torch.no_grad():  # q rows are exactly the drafter's distributions (the same transform as the target)
        q_fresh = T1.probs(dm(torch.tensor([tokens + d.tokens[:-1]])).logits[0, -3:])  # (3, V)
    assert torch.allclose(d.q, q_fresh, atol=1e-5)
    assert h.propose(tokens, 0, _AnyPolicy(), T1, None) == Draft([], None, "none")


@pytest.mark.parametrize("gamma", [1, 3, 6])
def test_greedy_matches_ar_with_both_sources(pair, gamma):
    target, drafter = pair
    out = verispec.generate(target, GREEDY_PROMPT, method="nasd+sd", drafter=drafter, gamma=gamma,
                            max_new_tokens=60)
    assert out.token_ids == ar(target.model, 60)
    s = out.stats
    by = {src: sum(st.accepted for st in s.steps if st.source == src) for src in ("ngram", "draft_model")}
    model_drafted = sum(st.drafted for st in s.steps if st.source == "draft_model")
    assert by["ngram"] >= 5 and model_drafted > 0  # both sources drafted; the store's drafts were accepted
    assert s.drafter_forwards == model_drafted  # one drafter forward per model-drafted token, none for n-grams


def test_greedy_matches_ar_when_the_model_drafts_well(pair):
    """A drafter equal to the target: the model rounds are accepted too, after n-gram rounds it skipped."""
    target, _ = pair
    for opts in ({}, {"min_context": 1, "min_count": 1}, {"max_n": 3, "min_context": 2, "min_count": 3}):
        out = verispec.generate(target, GREEDY_PROMPT, method="nasd+sd", drafter=copy.deepcopy(target.model),
                                gamma=4, max_new_tokens=60, **opts)
        assert out.token_ids == ar(target.model, 60), opts
        acc = {st.source: 0 for st in out.stats.steps}
        for st in out.stats.steps:
            acc[st.source] += st.accepted
        assert acc.get("ngram", 0) > 0 and acc.get("draft_model", 0) > 0, opts


class _Checked(HybridDrafter):
    """Records, after every commit, whether the drafter's cache holds only committed tokens."""

    def commit(self, tokens, draft, result):
        super().commit(tokens, draft, result)
        ids = self.draft_model.lm.ids
        self.clean.append(ids == tokens[: len(ids)])


def test_the_drafter_cache_stays_consistent_across_sources():
    target, dm = models()
    h = _Checked(NGramDrafter(min_context=1, min_count=2), DraftModelDrafter(dm, V))
    h.clean = []
    prompt = [1, 5, 2, 1, 5, 2, 1, 5, 3]
    out, s = run(target, h, 3, 40, prompt=prompt, sampling=Sampling(temperature=1.0, seed=3))
    sources = [st.source for st in s.steps]
    assert "ngram" in sources and "draft_model" in sources
    assert any(st.source == "draft_model" and st.accepted < st.drafted - 1 for st in s.steps)  # fed, then rejected
    assert len(h.clean) == len(s.steps) and all(h.clean)  # rejected drafts' KV entries dropped at every commit
    tokens = prompt + out
    lm = h.draft_model.lm
    cached = lm.forward(tokens, n_logits=3)  # (3, V): feeds only the tokens its cache lacks
    with torch.no_grad():
        fresh = dm(torch.tensor([tokens])).logits[0, -3:]  # (3, V) recomputed from scratch
    assert torch.allclose(cached, fresh, atol=1e-4)


HYB_PROMPT = [1, 5, 2, 1, 5, 2, 1, 5]  # round 1 is the store's ((2, 1, 5) -> 2 seen twice); after a rejection the
# next round is the store's again if the recovered token has a confident 1-token context, else the model's
MODEL_FIRST = HYB_PROMPT + [3]  # ends in an unseen token: round 1 is the model's


def test_both_sources_draft_and_are_kept_in_the_contract_law_world():
    """The contract suite's χ² for nasd+sd (tests/test_contract.py) runs in this world: both sources must draft
    there, and have drafts kept, for that test to cover the hybrid's mixing of sources."""
    from tests import test_contract as c

    target = tiny_llama(c.V, seed=11, scale=4.0)
    drafter = tiny_llama(c.V, seed=12, layers=1, hidden=16, scale=4.0)
    h = hybrid(drafter, c.V, min_context=2, min_count=2)  # the registry's defaults for nasd+sd
    drafted, accepted = {}, {}
    lm, g = CachedLM(target), torch.Generator().manual_seed(0)
    for _ in range(150):
        _, s = decode(lm, h, RejectionVerifier(), FixedGamma(c.K), c.LAW_PROMPT, max_new_tokens=c.N_TOKENS,
                      sampling=c.SAMPLING, stop_ids=frozenset(), method="nasd+sd", generator=g)
        for st in s.steps:
            drafted[st.source] = drafted.get(st.source, 0) + st.drafted
            accepted[st.source] = accepted.get(st.source, 0) + st.accepted
    assert drafted["ngram"] > 50 and drafted["draft_model"] > 50
    assert accepted["ngram"] > 10 and accepted["draft_model"] > 10


class _WrongQ(HybridDrafter):
    """Broken on purpose: model rounds report a uniform q instead of the distribution they sampled from."""

    def propose(self, tokens, gamma, policy, sampling, generator):
        d = super().propose(tokens, gamma, policy, sampling, generator)
        if d.q is not None:
            d.q = torch.full_like(d.q, 1.0 / d.q.shape[-1])  # (K, V)
        return d


def test_a_wrong_model_q_is_detected():
    """The statistic has power against the hybrid's model rounds at K = 2. (Reporting q = None for model tokens
    would *not* be a bug: a one-hot q is lossless for any draft token chosen without the target's randomness.)"""
    target, dm = models()
    job = law.job_for(target, lambda: _WrongQ(NGramDrafter(min_context=1, min_count=2), DraftModelDrafter(dm, V)),
                      lambda: FixedGamma(2))
    counts, rounds = law.draw(job, 1000, seed=1, n_tokens=3, sampling=T1, prompt=MODEL_FIRST)
    assert rounds.first[2].sum() == 1000  # every first round (the model's) drafted two tokens
    assert law.chi2_pvalue(counts, law.exact_law(target, MODEL_FIRST, 3, T1)) < 1e-6


@pytest.mark.parametrize("opts", [{"min_context": 0}, {"max_n": 3, "min_context": 3}, {"min_count": 0},
                                  {"max_n": 1}, {"max_contexts": -1}, {"min_counts": 2}])
def test_impossible_options_raise(pair, opts):
    target, drafter = pair
    with pytest.raises(ValueError, match=list(opts)[-1]):
        verispec.generate(target, GREEDY_PROMPT, method="nasd+sd", drafter=drafter, max_new_tokens=2, **opts)


def test_a_draft_model_is_required(pair):
    with pytest.raises(ValueError, match="needs a drafter model"):
        verispec.generate(pair[0], GREEDY_PROMPT, method="nasd+sd", max_new_tokens=2)
