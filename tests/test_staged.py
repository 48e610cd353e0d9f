"""Staged speculation (`verispec.drafters.staged`): the tree is the draft model's chain plus sibling leaves at the
first depths, with the right distribution per node. (Greedy equality and χ² run through the contract suite.)"""

from __future__ import annotations

import pytest
import torch

import verispec
from verispec.drafters.cascade import CascadeDrafter
from verispec.drafters.staged import StagedDrafter
from verispec.policies import FixedGamma
from verispec.sampling import Sampling
from tests.conftest import tiny_llama
from tests.test_contract import GREEDY_PROMPT, noisy_copy


@pytest.fixture(scope="module")
def drafter():
    return noisy_copy(tiny_llama(64, seed=1, scale=20.0), 0.6, 4)


def test_greedy_tree_is_the_chain_with_next_best_siblings(drafter):
    tokens = GREEDY_PROMPT * 2
    chain = CascadeDrafter(drafter, 64)
    chain.prefill(tokens)
    want = chain.propose(tokens, 4, FixedGamma(4), Sampling(), None).tokens
    s = StagedDrafter(drafter, 64, width=2, branch_depth=2)
    s.prefill(tokens)
    d = s.propose(tokens, 4, FixedGamma(4), Sampling(), None)
    # depth 1: chain token + 2 siblings (parent -1); depth 2: chain token + 2 siblings (parent = chain node 0)
    assert d.parents == [-1, -1, -1, 0, 0, 0, 3, 6] and d.q is None
    assert [d.tokens[i] for i in (0, 3, 6, 7)] == want
    with torch.no_grad():
        top = drafter(torch.tensor([tokens])).logits[0, -1].topk(3).indices.tolist()
    assert d.tokens[0] == top[0] and d.tokens[1:3] == top[1:3]
    assert len(set(d.tokens[0:3])) == 3 and len(set(d.tokens[3:6])) == 3


def test_sampled_siblings_report_their_law_without_replacement(drafter):
    tokens = GREEDY_PROMPT * 2
    s = StagedDrafter(drafter, 64, width=1, branch_depth=1)
    s.prefill(tokens)
    sampling = Sampling(temperature=1.0)
    d = s.propose(tokens, 3, FixedGamma(3), sampling, torch.Generator().manual_seed(1))
    assert d.parents[:2] == [-1, -1] and d.q.shape == (len(d.tokens), 64)
    q1 = d.q[0]
    torch.testing.assert_close(float(q1.sum()), 1.0)
    rest = q1.clone()
    rest[d.tokens[0]] = 0
    torch.testing.assert_close(d.q[1], rest / rest.sum())  # the sibling's law: q without the chain token
    assert d.tokens[1] != d.tokens[0]


def test_bad_options_are_refused(drafter):
    with pytest.raises(ValueError):
        verispec.generate(tiny_llama(64, seed=1), [1, 2, 3], drafter=drafter, method="staged", width=-1,
                          max_new_tokens=4)
