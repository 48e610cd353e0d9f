"""Sampling losslessness: speculative samples must follow the target's exact distribution, at every draft position.

Each test draws n generations of K + 1 tokens with FixedGamma(K), so the first round of every generation drafts K
tokens (the engine caps a round at the tokens left minus one), and compares the counts of whole (K + 1)-token
sequences with their exact joint law (tests/law.py: plain full forwards of the target, the sampling transform in
numpy). The tests assert that drafts at position K were both kept and rejected, so a mistake at any draft position
shows in the law. The same statistic is required to reject (a) a verifier whose recovered token ignores the residual
norm(max(0, p - q)), (b) a drafter that reports a distribution other than the one it sampled from and (c) a drafter
whose q is right for the first draft only (the "q read from row 0" bug), which no K = 1 run can see.

Every χ² docstring states the smallest total-variation bias its test detects with power 0.9 (law.min_detectable_tv:
worst case over the bias's shape, on the test's cells after pooling); test_stated_power_is_what_the_docstrings_say
recomputes those figures from the constants below.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from verispec.drafters.draft_model import DraftModelDrafter
from verispec.policies import FixedGamma
from verispec.sampling import Sampling
from verispec.types import Draft
from verispec.verifiers import RejectionVerifier
from tests import law
from tests.conftest import tiny_llama
from tests.law import chi2_pvalue, draw, exact_law, min_detectable_tv, pooled_cells, stated

# --- shared with other test files (test_ngram, test_rest, test_tree, ...): an 8-token pair and a 2-token law ---

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
            d.q = torch.full_like(d.q, 1.0 / d.q.shape[-1])  # (K, V)
        return d


class FirstRowDrafter(DraftModelDrafter):
    """Broken on purpose: reports q_1 (row 0) for every draft, though draft i was sampled from q_i. Exactly right
    when K = 1, wrong only from the second draft on."""

    def propose(self, tokens, gamma, policy, sampling, generator):
        d = super().propose(tokens, gamma, policy, sampling, generator)
        if d.q is not None:
            d.q = d.q[:1].expand_as(d.q).clone()  # (K, V) every row is q_1
        return d


def models():
    """The 8-token pair other test files use: different seeds and sharpness, so p and q differ a lot."""
    return tiny_llama(V, seed=11, scale=6.0), tiny_llama(V, seed=12, layers=1, hidden=16, scale=6.0)


def exact_two_token_law(target, sampling: Sampling) -> np.ndarray:
    """P(t1, t2 | PROMPT) under the target (the module's PROMPT, read at call time). (V*V,)"""
    return exact_law(target, PROMPT, 2, sampling)


# --- the draft-position tests: small vocabularies so V^(K+1) cells stay few ---

def small_models(v: int = 3):
    """A target and a drafter over v tokens that disagree (acceptance about 0.65) with moderately peaked laws
    (the target's top token has about half the mass)."""
    return tiny_llama(v, seed=3, scale=8.0), tiny_llama(v, seed=4, layers=1, hidden=16, scale=8.0)


def sd_job(target, drafter, K, drafter_cls=DraftModelDrafter, verifier_cls=RejectionVerifier) -> law.Job:
    """law.draw's job: draft-model SD with FixedGamma(K)."""
    return law.job_for(target, lambda: drafter_cls(drafter, target.config.vocab_size), lambda: FixedGamma(K),
                       verifier_cls)


T1 = Sampling(temperature=1.0)
FILTERED = Sampling(temperature=0.8, top_k=3, top_p=0.9)  # over 4 tokens: top-k and top-p both cut

# K -> (vocabulary, sampling, n, slow n): the draws of test_speculative_samples_follow_the_target.
SD_CASES = {2: (3, T1, 5000, 100_000), 3: (4, FILTERED, 6000, 100_000), 4: (3, T1, 6000, 100_000)}
VERIFIER_N = 100_000
BROKEN_N = {"residual": 1000, "uniform_q": 1000, "first_row_q": 1000}  # the negative controls, at K = 3


def check_rounds(rounds: law.Rounds, n: int, K: int) -> None:
    """Every first round drafted K tokens, and the K-th draft was both kept and rejected."""
    assert rounds.first.sum(1)[K] == n
    assert rounds.accepted_at(K) > 0.02 * n and rounds.rejected_at(K) > 0.02 * n


def run_sd(K: int, n: int, seed: int):
    v, s, _, _ = SD_CASES[K]
    target, drafter = small_models(v)
    counts, rounds = draw(sd_job(target, drafter, K), n, seed, K + 1, sampling=s)
    check_rounds(rounds, n, K)
    return counts, exact_law(target, law.PROMPT, K + 1, s)


@pytest.mark.parametrize("K", sorted(SD_CASES))
def test_speculative_samples_follow_the_target(K):
    """n generations of K + 1 tokens with FixedGamma(K): the joint law of all K + 1 tokens.

    K=2: n = 5000 draws, 27 cells: min detectable TV 0.049 (α = 0.001, power 0.9)
    K=3: n = 6000 draws, 34 cells: min detectable TV 0.046 (α = 0.001, power 0.9)
    K=4: n = 6000 draws, 189 cells: min detectable TV 0.065 (α = 0.001, power 0.9)
    """
    counts, p = run_sd(K, SD_CASES[K][2], seed=K)
    assert chi2_pvalue(counts, p) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("K", sorted(SD_CASES))
def test_speculative_samples_follow_the_target_1e5(K):
    """As above with 10^5 generations (several minutes each on two cores).

    K=2: n = 100000 draws, 27 cells: min detectable TV 0.011 (α = 0.001, power 0.9)
    K=3: n = 100000 draws, 35 cells: min detectable TV 0.011 (α = 0.001, power 0.9)
    K=4: n = 100000 draws, 243 cells: min detectable TV 0.017 (α = 0.001, power 0.9)
    """
    counts, p = run_sd(K, SD_CASES[K][3], seed=100 + K)
    assert chi2_pvalue(counts, p) > 1e-3


BROKEN = {"residual": dict(verifier_cls=ResidualIsTarget), "uniform_q": dict(drafter_cls=LyingDrafter),
          "first_row_q": dict(drafter_cls=FirstRowDrafter)}


@pytest.mark.parametrize("bug", sorted(BROKEN))
def test_broken_variants_are_detected(bug):
    """The statistic of test_speculative_samples_follow_the_target, at K = 3 over 3 tokens, rejects each bug.

    first_row_q: n = 1000 draws, 51 cells: min detectable TV 0.149 (α = 1e-06, power 0.9)
    residual: n = 1000 draws, 51 cells: min detectable TV 0.149 (α = 1e-06, power 0.9)
    uniform_q: n = 1000 draws, 51 cells: min detectable TV 0.149 (α = 1e-06, power 0.9)
    """
    target, drafter = small_models(3)
    n = BROKEN_N[bug]
    counts, rounds = draw(sd_job(target, drafter, 3, **BROKEN[bug]), n, 7, 4, sampling=T1)
    check_rounds(rounds, n, 3)
    assert chi2_pvalue(counts, exact_law(target, law.PROMPT, 4, T1)) < 1e-6


def test_first_row_q_is_invisible_at_k_1():
    """Why K >= 2 matters: with one draft per round the row-0 bug is not a bias at all — the same seeds give the
    very same generations as the honest drafter, so no K = 1 test of any size could catch it."""
    target, drafter = small_models(3)
    honest = draw(sd_job(target, drafter, 1), 200, 3, 2, sampling=T1)
    broken = draw(sd_job(target, drafter, 1, drafter_cls=FirstRowDrafter), 200, 3, 2, sampling=T1)
    assert np.array_equal(honest[0], broken[0]) and np.array_equal(honest[1].rounds, broken[1].rounds)
    assert honest[1].rejected_at(1) > 0


def test_verifier_alone_follows_the_target_over_1e5_rounds():
    """One verify round at a time, 10^5 rounds: the first emitted token must be distributed as p_0 for any
    drafter q, including q with mass where p has none and p with mass where q has none.

    n = 100000 draws, 4 cells: min detectable TV 0.008 (α = 0.001, power 0.9)
    """
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.2, 0.1, 0.0, 0.0])
    q = torch.tensor([0.1, 0.1, 0.0, 0.2, 0.3, 0.3])
    n = VERIFIER_N
    x = torch.multinomial(q, n, replacement=True, generator=g)  # (n,) draft tokens ~ q
    counts = np.zeros(6)
    ver = RejectionVerifier()
    Q = q[None].expand(1, 6)  # (1, V)
    P = torch.stack([p, p])  # (2, V)
    for xi in x.tolist():
        r = ver.verify(Draft([xi], Q), P, g)
        counts[xi if r.accepted else r.token] += 1
    assert chi2_pvalue(counts, p.double().numpy()) > 1e-3
    assert counts[4] == counts[5] == 0


def test_stated_power_is_what_the_docstrings_say():
    """The figures in the docstrings above follow from the tests' n and their exact laws' pooled cells."""
    for fn, n_of in ((test_speculative_samples_follow_the_target, 2),
                     (test_speculative_samples_follow_the_target_1e5, 3)):
        for K, case in SD_CASES.items():
            target, _ = small_models(case[0])
            n = case[n_of]
            line = stated(f"K={K}: ", n, pooled_cells(exact_law(target, law.PROMPT, K + 1, case[1]), n))
            assert line in fn.__doc__, line
    p3 = exact_law(small_models(3)[0], law.PROMPT, 4, T1)
    for bug, n in BROKEN_N.items():
        line = stated(f"{bug}: ", n, pooled_cells(p3, n), alpha=1e-6)
        assert line in test_broken_variants_are_detected.__doc__, line
    line = stated("", VERIFIER_N, 4)
    assert line in test_verifier_alone_follows_the_target_over_1e5_rounds.__doc__, line


def test_min_detectable_tv_is_the_power_of_the_chi2_test():
    """At the stated δ the χ² test has power 0.9 when λ = 4nδ²; any law at TV δ from p has λ >= 4nδ² (here: mass δ
    moved from cells B to cells A, λ = nδ²(1/P_A + 1/P_B), = 4nδ² when P_A = P_B = 1/2); and, by simulation, the
    test of chi2_pvalue rejects such a law in about 90% of n-draw samples."""
    from scipy import stats

    n, cells = 8000, 68
    d = min_detectable_tv(n, cells)
    assert stats.ncx2.sf(stats.chi2.isf(1e-3, cells - 1), cells - 1, 4 * n * d * d) == pytest.approx(0.9, abs=1e-6)
    assert min_detectable_tv(4 * n, cells) == pytest.approx(d / 2, rel=1e-6)
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(cells, 20.0))  # (cells,) every cell expects >= 5 of n
    order = np.argsort(p)
    A = np.zeros(cells, dtype=bool)
    A[order[::2]] = True  # alternate cells by size: P_A close to 1/2, the worst case
    q = np.where(A, p * (1 + d / p[A].sum()), p * (1 - d / p[~A].sum()))  # (cells,)
    assert q.sum() == pytest.approx(1) and 0.5 * np.abs(q - p).sum() == pytest.approx(d)
    lam = n * ((q - p) ** 2 / p).sum()
    assert 4 * n * d * d <= lam < 1.01 * 4 * n * d * d
    rejected = np.mean([chi2_pvalue(c, p) < 1e-3 for c in rng.multinomial(n, q, size=400)])  # (400, cells) draws
    assert 0.8 < rejected < 0.97


def test_draws_are_identical_inline_and_on_workers():
    """law.draw's chunks are seeded from (seed, chunk): forked workers and inline runs give the same counts."""
    target, drafter = small_models(3)
    a = draw(sd_job(target, drafter, 2), 200, 5, 3, sampling=T1, n_workers=1)
    b = draw(sd_job(target, drafter, 2), 200, 5, 3, sampling=T1, n_workers=2)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1].rounds, b[1].rounds) and a[0].sum() == 200
    c = draw(sd_job(target, drafter, 2), 200, 6, 3, sampling=T1, n_workers=1)
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("temperature,top_k,top_p", itertools.product([0.5, 1.0, 1.5], [0, 3], [1.0, 0.8]))
def test_sampling_transform_is_a_distribution(temperature, top_k, top_p):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    p = Sampling(temperature, top_k, top_p).probs(logits)
    assert torch.allclose(p.sum(-1), torch.ones(4))
    if top_k:
        assert int((p > 0).sum(-1).max()) <= top_k
