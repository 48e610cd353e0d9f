"""Sampling losslessness: speculative samples must follow the target's exact distribution.

These tests can fail: the same statistic is required to reject (a) a verifier whose recovered token ignores the
residual norm(max(0, p - q)) and (b) a drafter that reports a distribution other than the one it sampled from.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from verispec.cache import CachedLM
from verispec.drafters.draft_model import DraftModelDrafter
from verispec.engine import decode
from verispec.policies import FixedGamma
from verispec.sampling import Sampling
from verispec.verifiers import RejectionVerifier
from tests.conftest import tiny_llama

V = 8
PROMPT = [1, 5, 2]


class ResidualIsTarget(RejectionVerifier):
    """Broken on purpose: samples the recovered token from p instead of norm(max(0, p - q))."""

    @staticmethod
    def residual(p, q):
        return p


class LyingDrafter(DraftModelDrafter):
    """Broken on purpose: samples from q but tells the verifier q was uniform."""

    def propose(self, tokens, gamma, policy, sampling, generator):
        d = super().propose(tokens, gamma, policy, sampling, generator)
        if d.q is not None:
            d.q = torch.full_like(d.q, 1.0 / d.q.shape[-1])
        return d


def models():
    # Different seeds and sharpness so p and q differ a lot (acceptance well below 1, residual matters).
    return tiny_llama(V, seed=11, scale=6.0), tiny_llama(V, seed=12, layers=1, hidden=16, scale=6.0)


def exact_two_token_law(target, sampling: Sampling) -> np.ndarray:
    """P(t1, t2 | prompt) under the target and the sampling transform, from fresh full forwards. (V*V,)"""
    with torch.no_grad():
        p1 = sampling.probs(target(torch.tensor([PROMPT])).logits[0, -1:])[0]  # (V,)
        ctx = torch.tensor([PROMPT + [t] for t in range(V)])  # (V, T+1)
        p2 = sampling.probs(target(ctx).logits[:, -1])  # (V, V)
    law = (p1[:, None] * p2).reshape(-1).double().numpy()
    return law / law.sum()


def draw(target, drafter_model, sampling, n, gamma, verifier=RejectionVerifier(), drafter_cls=DraftModelDrafter):
    counts = np.zeros(V * V)
    lm = CachedLM(target)
    drafter = drafter_cls(drafter_model, V)
    g = torch.Generator().manual_seed(sampling.seed)
    for _ in range(n):
        ids, _ = decode(lm, drafter, verifier, FixedGamma(gamma), PROMPT, max_new_tokens=2, sampling=sampling,
                        stop_ids=frozenset(), method="sd", generator=g)
        counts[ids[0] * V + ids[1]] += 1
    return counts


def chi2_pvalue(counts: np.ndarray, law: np.ndarray) -> float:
    n = counts.sum()
    keep = law * n >= 5  # pool sparse cells so the χ² approximation holds
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(law[keep] * n, law[~keep].sum() * n)
    if exp[-1] == 0:
        assert obs[-1] == 0, "sampled a sequence the target gives probability 0"
        obs, exp = obs[:-1], exp[:-1]
    return float(stats.chisquare(obs, exp).pvalue)


SAMPLINGS = [Sampling(temperature=1.0, seed=1), Sampling(temperature=0.7, top_k=5, top_p=0.9, seed=2)]


@pytest.mark.parametrize("sampling,n", [(SAMPLINGS[0], 100_000), (SAMPLINGS[1], 20_000)],
                         ids=lambda x: x.describe() if isinstance(x, Sampling) else str(x))
def test_speculative_samples_follow_the_target(sampling, n):
    """10^5 end-to-end generations of two tokens (about 3.5 minutes on one core)."""
    target, drafter = models()
    law = exact_two_token_law(target, sampling)
    counts = draw(target, drafter, sampling, n, gamma=2)
    assert chi2_pvalue(counts, law) > 1e-3
    tv = 0.5 * np.abs(counts / counts.sum() - law).sum()
    assert tv < 3 / np.sqrt(n)  # E[TV] for 64 cells is about 2.5/sqrt(n) at most


def test_broken_residual_is_detected():
    target, drafter = models()
    s = SAMPLINGS[0]
    counts = draw(target, drafter, s, 6000, gamma=2, verifier=ResidualIsTarget())
    assert chi2_pvalue(counts, exact_two_token_law(target, s)) < 1e-6


def test_wrong_draft_probabilities_are_detected():
    target, drafter = models()
    s = SAMPLINGS[0]
    counts = draw(target, drafter, s, 6000, gamma=2, drafter_cls=LyingDrafter)
    assert chi2_pvalue(counts, exact_two_token_law(target, s)) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("gamma", [1, 4])
def test_speculative_samples_follow_the_target_other_gammas(gamma):
    target, drafter = models()
    s = Sampling(temperature=1.0, seed=7 + gamma)
    counts = draw(target, drafter, s, 100_000, gamma=gamma)
    assert chi2_pvalue(counts, exact_two_token_law(target, s)) > 1e-3


def test_verifier_alone_follows_the_target_over_1e5_rounds():
    """One verify round at a time, 2·10^5 rounds: the first emitted token must be distributed as p_0 for any
    drafter q, including q with mass where p has none and p with mass where q has none."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.2, 0.1, 0.0, 0.0])
    q = torch.tensor([0.1, 0.1, 0.0, 0.2, 0.3, 0.3])
    n = 200_000
    x = torch.multinomial(q, n, replacement=True, generator=g)  # (n,) draft tokens ~ q
    counts = np.zeros(6)
    ver = RejectionVerifier()
    from verispec.types import Draft

    Q = q[None].expand(1, 6)
    P = torch.stack([p, p])
    for xi in x.tolist():
        r = ver.verify(Draft([xi], Q), P, g)
        counts[xi if r.accepted else r.token] += 1
    assert chi2_pvalue(counts, p.double().numpy()) > 1e-3
    assert counts[4] == counts[5] == 0


@pytest.mark.parametrize("temperature,top_k,top_p", itertools.product([0.5, 1.0, 1.5], [0, 3], [1.0, 0.8]))
def test_sampling_transform_is_a_distribution(temperature, top_k, top_p):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    p = Sampling(temperature, top_k, top_p).probs(logits)
    assert torch.allclose(p.sum(-1), torch.ones(4))
    if top_k:
        assert int((p > 0).sum(-1).max()) <= top_k
