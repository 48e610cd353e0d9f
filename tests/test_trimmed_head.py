"""The drafter's frequency-trimmed output layer (FR-Spec): its logits, the token choice, greedy equality with AR and
the sampling law with a drafter that can only propose a few tokens."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import verispec
from verispec.backends import apply_backend
from verispec.datastore import Datastore
from verispec.drafters.draft_model import DraftModelDrafter
from verispec.drafters.trimmed_head import token_counts, top_ids, trimmed_head
from tests import law
from tests.conftest import tiny_llama
from tests.law import chi2_pvalue, draw, exact_law, pooled_cells, stated
from tests.test_distribution import T1, check_rounds, sd_job, small_models
from tests.test_ngram import GREEDY_PROMPT, ar


@pytest.mark.parametrize("backend", ["torch", "fast", "fast-int4"])
def test_trimmed_logits_equal_the_full_layer_on_the_kept_tokens(backend):
    model = tiny_llama(64, seed=4)
    h = torch.randn(3, 32)  # (n, H)
    apply_backend(model, backend)
    with torch.no_grad():
        full = model.lm_head(h)  # (n, V) the layer as the backend computes it
    ids = torch.tensor([0, 5, 9, 33, 63])
    head = trimmed_head(model, ids, 64, backend)
    with torch.no_grad():
        out = head(h)  # (n, V)
    # exact for fp32 backends; int4 re-quantizes the probed (bf16-rounded) weights: equal up to bf16 rounding
    tol = 1e-5 if backend in ("torch", "fast") else 2e-2 * float(full.abs().max())
    assert torch.allclose(out[:, ids], full[:, ids], atol=tol)
    rest = torch.ones(64, dtype=torch.bool)
    rest[ids] = False
    assert torch.isneginf(out[:, rest]).all()


def test_top_ids_by_count_then_id_plus_stop_tokens():
    counts = np.array([5, 0, 7, 7, 1, 0])
    assert top_ids(counts, 2).tolist() == [2, 3]
    assert top_ids(counts, 3).tolist() == [0, 2, 3]
    assert top_ids(counts, 3, frozenset({5})).tolist() == [0, 2, 3, 5]
    ds = Datastore.from_docs([[1, 2, 2], [2, 3]], vocab_size=6)
    assert token_counts(ds, 6).tolist() == [0, 1, 3, 1, 0, 0]
    with pytest.raises(ValueError, match="vocabulary size"):
        token_counts(ds, 3)


def corpus_of(ids: list[int], vocab: int) -> Datastore:
    return Datastore.from_docs([ids], vocab_size=vocab)


@pytest.mark.parametrize("k", [4, 24])
def test_greedy_sd_with_a_trimmed_drafter_equals_ar(pair, k):
    target, drafter = pair
    plain = ar(target.model, 40)
    corpus = corpus_of((GREEDY_PROMPT + plain) * 2, 64)  # the output's own tokens are the frequent ones
    out = verispec.generate(target, GREEDY_PROMPT, drafter=drafter.model, gamma=4, max_new_tokens=40,
                            draft_vocab=k, vocab_corpus=corpus)
    assert out.token_ids == plain
    full = verispec.generate(target, GREEDY_PROMPT, drafter=drafter.model, gamma=4, max_new_tokens=40)
    assert full.token_ids == plain
    assert out.stats.drafted > 0


class TrimmedDrafter(DraftModelDrafter):
    """test_distribution's 3-token drafter, cut to tokens 1 and 2: it never proposes token 0, which the target
    gives real mass (the recovered and bonus tokens must supply it)."""

    def __init__(self, model, vocab_size, ids=(1, 2), lie=False):
        super().__init__(model, vocab_size, head=trimmed_head(model, torch.tensor(ids), vocab_size, "torch"))
        self.lie = lie
        self.full = DraftModelDrafter(model, vocab_size)

    def propose(self, tokens, gamma, policy, sampling, generator):
        d = super().propose(tokens, gamma, policy, sampling, generator)
        if self.lie and d.q is not None:  # broken on purpose: report the untrimmed drafter's q
            d.q = torch.stack([sampling.probs(self.full.lm.forward(tokens + d.tokens[:i], 1))[0]
                               for i in range(len(d.tokens))])  # (K, V)
        return d


K_TRIM = 3  # drafts per first round; the law is that of K + 1 tokens
TRIM_N, LIE_N = 3000, 1000


def trimmed_draw(n: int, seed: int, lie: bool):
    target, drafter = small_models(3)
    job = sd_job(target, drafter, K_TRIM, drafter_cls=functools.partial(TrimmedDrafter, lie=lie))
    counts, rounds = draw(job, n, seed, K_TRIM + 1, sampling=T1)
    check_rounds(rounds, n, K_TRIM)
    return counts, exact_law(target, law.PROMPT, K_TRIM + 1, T1)


def test_samples_follow_the_target_with_a_trimmed_drafter():
    """K = 3 drafts per first round, 4 tokens.

    n = 3000 draws, 74 cells: min detectable TV 0.076 (α = 0.001, power 0.9)
    """
    counts, p = trimmed_draw(TRIM_N, 8, lie=False)
    assert chi2_pvalue(counts, p) > 1e-3


def test_reporting_the_untrimmed_q_is_detected():
    """n = 1000 draws, 51 cells: min detectable TV 0.149 (α = 1e-06, power 0.9)"""
    counts, p = trimmed_draw(LIE_N, 9, lie=True)
    assert chi2_pvalue(counts, p) < 1e-6


def test_stated_power_is_what_the_docstrings_say():
    p = exact_law(small_models(3)[0], law.PROMPT, K_TRIM + 1, T1)
    for fn, n, alpha in ((test_samples_follow_the_target_with_a_trimmed_drafter, TRIM_N, 1e-3),
                         (test_reporting_the_untrimmed_q_is_detected, LIE_N, 1e-6)):
        line = stated("", n, pooled_cells(p, n), alpha)
        assert line in fn.__doc__, line


@pytest.mark.parametrize("opts, match", [({"draft_vocab": -1}, "draft_vocab"), ({"draft_vocab": 1.5}, "draft_vocab"),
                                         ({"vocab_corpus": "x.npz"}, "only with draft_vocab"),
                                         ({"draft_vocab": 8}, "needs token frequencies")])
def test_bad_options(pair, opts, match):
    target, drafter = pair
    with pytest.raises(ValueError, match=match):
        verispec.generate(target, GREEDY_PROMPT, drafter=drafter, max_new_tokens=2, **opts)

