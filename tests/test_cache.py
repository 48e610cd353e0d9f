"""KV rollback: after any accept/reject pattern the caches must give the logits of a fresh recomputation."""

from __future__ import annotations

import copy

import torch
from hypothesis import given, settings, strategies as st

import verispec
from verispec.cache import CachedLM
from verispec.drafters.draft_model import DraftModelDrafter
from verispec.engine import decode
from verispec.policies import FixedGamma
from verispec.sampling import Sampling
from verispec.verifiers import RejectionVerifier
from tests.conftest import tiny_llama

MODEL = tiny_llama(32, seed=5)


def fresh_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0, -1]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, 31), min_size=1, max_size=6), st.integers(0, 8)),
                min_size=1, max_size=8))
def test_feed_and_rollback_match_fresh_recomputation(ops):
    """Append a block (like a draft), then keep only a prefix of it (like a rejection), repeatedly."""
    lm = CachedLM(MODEL)
    seq = [1, 2, 3]
    for block, keep in ops:
        cached = lm.forward(seq + block, n_logits=len(block) + 1)  # (K+1, V)
        full = MODEL(torch.tensor([seq + block])).logits[0, -(len(block) + 1):].detach()
        assert torch.allclose(cached, full, atol=1e-5)
        seq = seq + block[: min(keep, len(block))]
        lm.rollback(seq)
        assert lm.ids == seq[: len(lm.ids)] and lm.cache.get_seq_length() == len(lm.ids)
    assert torch.allclose(lm.forward(seq, 1)[0], fresh_logits(MODEL, seq), atol=1e-5)


def test_caches_after_speculative_generation_equal_fresh_ones():
    target = tiny_llama(32, seed=6, scale=4.0)
    drafter_model = copy.deepcopy(target)  # a noisy copy: agrees often, not always
    with torch.no_grad():
        drafter_model.lm_head.weight.add_(torch.randn(drafter_model.lm_head.weight.shape,
                                                      generator=torch.Generator().manual_seed(9)) * 0.3)
    for sampling in (Sampling(), Sampling(temperature=1.0, seed=3)):
        lm, drafter = CachedLM(target), DraftModelDrafter(drafter_model, 32)
        prompt = [4, 8, 15, 16, 23]
        ids, stats = decode(lm, drafter, RejectionVerifier(), FixedGamma(3), prompt, max_new_tokens=30,
                            sampling=sampling, stop_ids=frozenset(), method="sd",
                            generator=torch.Generator().manual_seed(0))
        assert 0 < stats.accepted < stats.drafted  # a mix of accepted and rejected drafts happened
        tokens = prompt + ids
        # Both caches hold exactly the committed tokens except the last (pending) one.
        assert lm.ids == tokens[:-1] and lm.cache.get_seq_length() == len(tokens) - 1
        assert drafter.lm.ids == tokens[: len(drafter.lm.ids)]
        assert torch.allclose(lm.forward(tokens, 1)[0], fresh_logits(target, tokens), atol=1e-5)
        assert torch.allclose(drafter.lm.forward(tokens, 1)[0], fresh_logits(drafter_model, tokens), atol=1e-5)


def test_padded_drafter_vocabulary_is_aligned_to_the_target():
    """A drafter whose output layer is wider than the target's is cut to the target's width (and padded with
    -inf when narrower), so q and p share one index space."""
    target = tiny_llama(32, seed=6)
    wide = tiny_llama(40, seed=8)
    assert CachedLM(wide, 32).forward([1, 2], 1).shape == (1, 32)
    narrow = tiny_llama(24, seed=8)
    row = CachedLM(narrow, 32).forward([1, 2], 1)[0]
    assert row.shape == (32,) and torch.isinf(row[24:]).all()
    out = verispec.generate(target, [1, 2, 3], drafter=copy.deepcopy(target), max_new_tokens=5)
    assert out.stats.acceptance_rate == 1.0
