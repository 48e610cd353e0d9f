"""Lookahead decoding: the Jacobi window and n-gram pool on their own, its tree forward against sequential
decoding and greedy equality with AR (its sampling law at K = 2, with the negative control, is in the contract
suite, tests/test_contract.py)."""

from __future__ import annotations

import copy

import pytest
import torch

import verispec
from verispec.cache import CachedLM
from verispec.drafters.lookahead import LookaheadDrafter
from verispec.policies import FixedGamma
from verispec.sampling import Sampling
from tests.conftest import tiny_llama
from tests.test_ngram import GREEDY_PROMPT, ar, run
from tests.test_tree import chain_of, fresh_logits

T1 = Sampling(temperature=1.0, seed=1)


def onehot_rows(ids: list[int], V: int = 64) -> torch.Tensor:
    out = torch.zeros(len(ids), V)  # (S, V)
    out[torch.arange(len(ids)), torch.tensor(ids)] = 1.0
    return out


def test_window_warms_up_then_collects_one_ngram_per_column():
    d = LookaheadDrafter(window=3, ngram=4, guesses=3)
    d.prefill([10, 11, 12, 13])
    assert len(d.levels) == 1 and len(d.levels[0]) == 3 and set(d.levels[0]) <= {10, 11, 12, 13}
    L0 = list(d.levels[0])
    for it, new in enumerate(([20, 21, 22], [30, 31, 32])):  # two warm-up rounds fill levels 1 and 2
        x = d.propose([1, 2, 3], 4, FixedGamma(4), Sampling(), None)
        assert len(x.side_tokens) == 3 * (it + 1)
        top = len(d.levels) - 1
        logits = torch.zeros(len(x.side_tokens), 64)
        logits[top * 3:] = onehot_rows(new)
        d.observe(x, logits)
        assert not d.pool
    assert d.levels == [L0, [20, 21, 22], [30, 31, 32]]
    x = d.propose([1, 2, 3], 4, FixedGamma(4), Sampling(), None)
    logits = torch.zeros(9, 64)
    logits[6:] = onehot_rows([40, 41, 42])
    d.observe(x, logits)
    for i in range(3):  # column i yields (L0[i], L1[i], L2[i], new[i])
        assert (20 + i, 30 + i, 40 + i) in d.pool[L0[i]]
    assert d.levels == [[20, 21, 22], [30, 31, 32], [40, 41, 42]]


def test_side_nodes_form_the_lookahead_mask():
    """Level 0 is a chain under the pending token; level l, column i hangs under level l - 1, column i."""
    d = LookaheadDrafter(window=3, ngram=3, guesses=2)
    d.prefill([1, 2, 3])
    d.levels = [[1, 2, 3], [4, 5, 6]]
    d.pool = {9: {(7, 8): None}}
    x = d.propose([9], 4, FixedGamma(4), Sampling(), None)
    K = 2
    assert x.tokens == [7, 8] and x.parents == [-1, 0]
    assert x.side_parents == [-1, K + 0, K + 1, K + 0, K + 1, K + 2]
    assert x.depths()[K:] == [1, 2, 3, 2, 3, 4]  # level l, column i sits at offset i + l + 1


def test_candidates_merge_into_a_trie_and_respect_gamma():
    d = LookaheadDrafter(window=2, ngram=4, guesses=3)
    d.prefill([1, 2])
    for g in [(9, 1, 2, 3), (9, 1, 2, 4), (9, 1, 5, 6), (8, 1, 1, 1)]:
        d.add(g)
    x = d.propose([0, 9], 2, FixedGamma(2), Sampling(), None)
    assert len(x) == 2 and sorted(zip(x.tokens, x.parents)) == [(1, -1), (2, 0), (5, 0)]
    x = d.propose([0, 9], 4, FixedGamma(4), Sampling(), None)
    assert len(x.tokens) == 6 and len(x) == 3


def test_pool_keeps_the_most_recent_guesses_per_token():
    d = LookaheadDrafter(window=2, ngram=2, guesses=2)
    for t in (1, 2, 3, 2):
        d.add((7, t))
    assert list(d.pool[7]) == [(3,), (2,)]


def test_memory_is_bounded_over_a_long_generation(pair):
    target, _ = pair
    d = LookaheadDrafter(window=5, ngram=3, guesses=3, pool_from_text=True)
    ids, s = run(target.model, d, 4, 300)
    assert ids == ar(target.model, 300)
    assert len(d.levels) == 2 and all(len(level) == 5 for level in d.levels)
    assert d.pool and max(len(c) for c in d.pool.values()) == 3  # the cap was reached and held


def test_lookahead_forward_equals_sequential_decoding():
    """The tree forward of a real Lookahead round (verification trie + Jacobi window) gives, at every node, the
    logits of feeding its ancestors one by one."""
    model = tiny_llama(64, seed=5)
    d = LookaheadDrafter(window=3, ngram=3, guesses=3, pool_from_text=True)
    prompt = GREEDY_PROMPT
    d.prefill(prompt)
    d.levels.append([60, 61, 62])
    x = d.propose(prompt, 4, FixedGamma(4), Sampling(), None)
    assert x.tokens and len(x.side_tokens) == 6
    lm = CachedLM(model)
    lm.reset()
    lm.prefill(prompt[:-1])
    logits = lm.score(prompt, x)
    nodes, parents = x.tokens + x.side_tokens, x.parents + x.side_parents
    for i in range(len(nodes)):
        assert torch.allclose(logits[1 + i], fresh_logits(model, prompt + chain_of(i, nodes, parents)), atol=1e-5)


@pytest.mark.parametrize("opts", [{}, {"window": 2, "ngram": 2, "guesses": 1}, {"window": 6, "ngram": 5},
                                  {"pool_from_text": True}])
@pytest.mark.parametrize("gamma", [1, 4])
def test_greedy_matches_ar_and_drafts_are_accepted(pair, opts, gamma):
    target, _ = pair
    out = verispec.generate(target, GREEDY_PROMPT, method="lookahead", gamma=gamma, max_new_tokens=60, **opts)
    assert out.token_ids == ar(target.model, 60)
    s = out.stats
    assert s.accepted >= 5 and s.drafter_forwards == 0
    assert s.target_forwards == len(s.steps)  # one target forward per round, window included


@pytest.mark.parametrize("eos_at", [0, 5, 20])
def test_generation_ends_at_a_stop_token_inside_the_tree(pair, eos_at):
    target, _ = pair
    plain = ar(target.model, 40)
    model = copy.deepcopy(target.model)
    model.config.eos_token_id = model.generation_config.eos_token_id = plain[eos_at]
    out = verispec.generate(model, GREEDY_PROMPT, method="lookahead", max_new_tokens=40, pool_from_text=True)
    assert out.token_ids == plain[:plain.index(plain[eos_at]) + 1] and out.stats.stop_reason == "stop_token"


@pytest.mark.parametrize("opts", [{"window": 0}, {"ngram": 1}, {"guesses": 0}, {"pool_from_text": 1},
                                  {"window": 2.5}])
def test_impossible_options_raise(pair, opts):
    with pytest.raises(ValueError, match=next(iter(opts))):
        verispec.generate(pair[0], GREEDY_PROMPT, method="lookahead", max_new_tokens=2, **opts)


def test_unknown_option_is_named(pair):
    with pytest.raises(ValueError, match="windw.*lookahead"):
        verispec.generate(pair[0], GREEDY_PROMPT, method="lookahead", max_new_tokens=2, windw=3)
