"""Token trees: the tree forward (4D mask + position ids) against sequential decoding, the KV cache after a tree
round against a fresh computation, and the tree verifier's output law (with a negative control that must fail)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from verispec.cache import CachedLM
from verispec.drafters.base import Drafter
from verispec.policies import FixedGamma
from verispec.sampling import Sampling, sample
from verispec.types import Draft
from verispec.verifiers import RejectionVerifier
from verispec.drafters.children import SCHEMES
from verispec.verifiers.tree import verify_tree
from tests.conftest import tiny_llama
from tests import law
from tests.law import chi2_pvalue
from tests.test_distribution import models

PREFIX = [3, 17, 42, 5, 9, 11, 2]
# node:        0   1   2   3   4   5   6
TREE_TOKENS = [8, 30, 8, 12, 30, 4, 8]
TREE_PARENTS = [-1, -1, 0, 0, 2, 1, 5]  # two roots; node 2 repeats node 0's token one level deeper
SIDE_TOKENS = [40, 41, 42, 7]
SIDE_PARENTS = [-1, 7, 8, 1]  # a chain of side nodes under the pending token, and one under draft node 1


def chain_of(i: int, tokens: list[int], parents: list[int]) -> list[int]:
    out = []
    while i >= 0:
        out.append(tokens[i])
        i = parents[i]
    return out[::-1]


def fresh_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]  # (V,)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(64, seed=3, layers=2)


def tree_draft() -> Draft:
    return Draft(TREE_TOKENS, None, "test", parents=TREE_PARENTS, side_tokens=SIDE_TOKENS, side_parents=SIDE_PARENTS)


@pytest.mark.parametrize("cached", [0, 4, 6])
def test_tree_forward_equals_sequential_decoding(model, cached):
    """Every node's logits equal a fresh forward of prefix + its ancestors + itself; also with part of the
    committed text missing from the cache (it is fed as a chain before the tree)."""
    lm = CachedLM(model)
    lm.reset()
    if cached:
        lm.prefill(PREFIX[:cached])
    d = tree_draft()
    logits = lm.score(PREFIX, d)  # (1 + K + S, V)
    assert logits.shape == (1 + len(TREE_TOKENS) + len(SIDE_TOKENS), 64)
    assert torch.allclose(logits[0], fresh_logits(model, PREFIX), atol=1e-5)
    nodes, parents = d.tokens + d.side_tokens, d.parents + d.side_parents
    for i in range(len(nodes)):
        ref = fresh_logits(model, PREFIX + chain_of(i, nodes, parents))
        assert torch.allclose(logits[1 + i], ref, atol=1e-5), i
    assert len(d) == 3 and d.depths() == [1, 1, 2, 2, 3, 2, 3, 1, 2, 3, 2]


@pytest.mark.parametrize("committed_nodes, extra", [([], [55]), ([0], [55]), ([0, 2, 4], [55]), ([1, 5, 6], [1]),
                                                    ([0, 3], [])])
def test_cache_after_a_tree_round_equals_a_fresh_one(model, committed_nodes, extra):
    """Keep the matching path's KV entries, drop the rest: the next forward equals a fresh computation."""
    lm = CachedLM(model)
    lm.reset()
    lm.prefill(PREFIX[:-1])
    lm.score(PREFIX, tree_draft())
    committed = PREFIX + [TREE_TOKENS[i] for i in committed_nodes] + extra
    assert lm.rollback(committed) == len(PREFIX) + len(committed_nodes)
    assert lm.cache.get_seq_length() == len(lm.ids) == len(PREFIX) + len(committed_nodes)
    nxt = committed + [21, 22]
    out = lm.forward(nxt, n_logits=3)  # (3, V)
    for j in range(3):
        assert torch.allclose(out[j], fresh_logits(model, nxt[:len(nxt) - 2 + j]), atol=1e-5)


@pytest.mark.parametrize("committed_nodes", [[], [1, 5, 6], [0, 2, 4]])
def test_a_tree_grown_level_by_level_equals_one_tree_forward(model, committed_nodes):
    """extend_tree (a drafter feeding one level at a time): each new node's logits equal a fresh forward of prefix +
    its ancestors + itself, and after the round's rollback the cache equals a fresh one."""
    lm = CachedLM(model)
    lm.reset()
    lm.prefill(PREFIX[:-1])
    depths = Draft(TREE_TOKENS, None, "t", parents=TREE_PARENTS).depths()
    levels = [[i for i, d in enumerate(depths) if d == k] for k in (1, 2, 3)]  # nodes 0,1 | 2,3,5 | 4,6
    order = [i for lv in levels for i in lv]  # parents before children, level by level
    new = {old: j for j, old in enumerate(order)}
    toks = [TREE_TOKENS[i] for i in order]
    pars = [-1 if TREE_PARENTS[i] < 0 else new[TREE_PARENTS[i]] for i in order]
    first = len(levels[0])
    rows = list(lm.score(PREFIX, Draft(toks[:first], None, "t", parents=pars[:first]))[1:])
    at = first
    for lv in levels[1:]:
        rows += list(lm.extend_tree(toks[at:at + len(lv)], pars[at:at + len(lv)]))
        at += len(lv)
    assert lm.forwards == 4 and lm.tokens_processed == len(PREFIX) + len(toks)  # prefill, then each node once
    for j in range(len(toks)):
        assert torch.allclose(rows[j], fresh_logits(model, PREFIX + chain_of(j, toks, pars)), atol=1e-5), j
    committed = PREFIX + [TREE_TOKENS[i] for i in committed_nodes] + [55]
    assert lm.rollback(committed) == len(PREFIX) + len(committed_nodes)
    out = lm.forward(committed + [21], n_logits=2)  # (2, V)
    assert torch.allclose(out[1], fresh_logits(model, committed + [21]), atol=1e-5)
    with pytest.raises(ValueError, match="previous score"):
        lm.extend_tree([1], [-1])


def test_side_node_on_the_committed_path_is_kept(model):
    """A side node whose ancestors are all committed holds valid KV entries too (Lookahead's level 0)."""
    lm = CachedLM(model)
    lm.reset()
    lm.prefill(PREFIX[:-1])
    lm.score(PREFIX, tree_draft())
    assert lm.rollback(PREFIX + [40, 41, 9]) == len(PREFIX) + 2


def test_greedy_tree_walk_follows_the_argmax(model):
    """One-hot p: the verifier keeps the child equal to the argmax at every node and emits the next argmax."""
    d = Draft(TREE_TOKENS, None, "t", parents=TREE_PARENTS)
    p = torch.zeros(1 + len(TREE_TOKENS), 64)
    for row, best in {0: 30, 2: 7, 6: 8, 7: 50}.items():  # row 1 + i holds node i's next-token law
        p[row, best] = 1.0
    p[1:, 0] += 1.0 * (p[1:].sum(-1) == 0)  # rows not set above: argmax token 0
    r = verify_tree(d, p, torch.Generator().manual_seed(0))
    assert r.path == [1] and r.accepted == 1 and r.token == 7 and r.kind == "recovered"  # node 5 (4) != 7
    p[2] = 0
    p[2, 4] = 1.0  # now node 1's argmax is its child 5 (token 4), whose argmax is its child 6 (token 8)
    r = verify_tree(d, p, torch.Generator().manual_seed(0))
    assert r.path == [1, 5, 6] and r.emitted(d) == [30, 4, 8, 50] and r.kind == "bonus"


class FixedTreeDrafter(Drafter):
    """Proposes the same token tree every round (over the 8-token vocabulary of test_distribution's models)."""

    name = "tree"
    tokens = [5, 2, 1, 2, 7]
    parents = [-1, -1, 0, 0, 1]

    def propose(self, tokens, gamma, policy, sampling, generator):
        keep = [i for i, dep in enumerate(Draft(self.tokens, parents=self.parents).depths()) if dep <= gamma]
        return Draft([self.tokens[i] for i in keep], None, self.name, parents=[self.parents[i] for i in keep])


class RecoverFromTarget(RejectionVerifier):
    """Broken on purpose: after rejecting every child, samples from p instead of p without the rejected tokens."""

    def verify(self, draft, p, generator):
        r = super().verify(draft, p, generator)
        if r.kind == "recovered":
            r.token = sample(p[(r.path[-1] + 1) if r.path else 0], generator)
        return r


PROMPT3 = [1, 5, 2, 1, 5, 2]
T1 = Sampling(temperature=1.0, seed=4)


def draw_tree(verifier_cls, n_draws: int):
    """n_draws generations of 3 tokens with the fixed tree (2 levels: the first round verifies the whole tree)."""
    job = law.job_for(models()[0], FixedTreeDrafter, lambda: FixedGamma(2), verifier_cls)
    return law.draw(job, n_draws, seed=T1.seed, n_tokens=3, sampling=T1, prompt=PROMPT3)


def test_tree_samples_follow_the_target():
    """The tree rule at depth 2 against the exact law (numpy, tests/law.py); nodes kept at both depths."""
    counts, rounds = draw_tree(RejectionVerifier, 6000)
    assert rounds.accepted_at(1) > 2000 and rounds.accepted_at(2) > 100
    assert law.chi2_pvalue(counts, law.exact_law(models()[0], PROMPT3, 3, T1)) > 1e-3


def test_a_tree_verifier_that_forgets_rejected_children_is_detected():
    counts, _ = draw_tree(RecoverFromTarget, 2000)
    assert law.chi2_pvalue(counts, law.exact_law(models()[0], PROMPT3, 3, T1)) < 1e-6


def test_parents_must_come_first():
    with pytest.raises(ValueError, match="parents must come before"):
        Draft([1, 2], parents=[1, -1]).depths()


# -- sampled children: SpecInfer's i.i.d. draws and recursive rejection sampling without replacement ------------------

P_NODE = torch.tensor([0.45, 0.25, 0.15, 0.1, 0.05, 0.0])  # the target's law at the node
Q_NODE = torch.tensor([0.05, 0.1, 0.2, 0.25, 0.3, 0.1])  # the drafter's: most of its mass where p has little
NODE_N = 30_000


def node_round_counts(scheme, k: int, n: int, seed: int, report=None):
    """n verify rounds of one node whose k children were drawn from Q_NODE by `scheme`: counts of the token emitted
    at the node (the kept child or the recovered token), and how many rounds kept a child. `report` turns the drawn
    children's distributions into what the drafter claims (a broken drafter)."""
    g = torch.Generator().manual_seed(seed)
    counts, kept = np.zeros(6), 0
    for _ in range(n):
        xs, qs = scheme(Q_NODE, k, g)
        d = Draft(xs, torch.stack(report(xs, qs) if report else qs), "test", parents=[-1] * len(xs))
        r = verify_tree(d, torch.stack([P_NODE] * (1 + len(xs))), g)  # (1 + k, V); only the root's row matters here
        counts[d.tokens[r.path[0]] if r.path else r.token] += 1
        kept += bool(r.path)
    return counts, kept


@pytest.mark.parametrize("k", [2, 3])
def test_sampled_children_follow_the_target(k):
    """Both schemes emit exactly p at the node, and drawing without replacement keeps a child more often.
    n = 30000 rounds, 5 cells: the smallest TV bias detected is about 0.01."""
    kept = {}
    for name, scheme in SCHEMES.items():
        counts, kept[name] = node_round_counts(scheme, k, NODE_N, seed=k)
        assert chi2_pvalue(counts, P_NODE.double().numpy()) > 1e-3, name
        assert counts[5] == 0  # p has no mass there, q has
    assert kept["without_replacement"] > kept["iid"] * 1.02


def claim_without_replacement(xs: list[int], qs: list[torch.Tensor]) -> list[torch.Tensor]:
    """What a without-replacement drafter would report for children xs drawn from qs[0]: for child j, qs[0] with the
    earlier siblings removed and renormalised (a broken drafter's claim when xs were drawn i.i.d.)."""
    out, q = [], qs[0]
    for x in xs:
        out.append(q)
        q = q.clone()
        q[x] = 0.0
        q = q / q.sum() if q.sum() > 0 else q
    return out


def test_iid_draws_reported_as_drawn_without_replacement_are_detected():
    """Drawing with replacement under the without-replacement rule: the drafter draws i.i.d. but reports for child j
    q with the earlier siblings removed and renormalised, as a without-replacement drafter would."""
    counts, _ = node_round_counts(SCHEMES["iid"], 3, 5000, seed=9, report=claim_without_replacement)
    assert chi2_pvalue(counts, P_NODE.double().numpy()) < 1e-6


def test_reusing_p_after_a_rejection_is_detected(monkeypatch):
    """A verifier that tries the next child against p instead of the residual norm(max(0, r − q))."""
    from verispec.verifiers import tree

    real = tree.try_children

    def stale(r, tokens, qs, generator):
        for j, (x, q) in enumerate(zip(tokens, qs)):
            kept, _ = real(r, [x], [q], generator)
            if kept is not None:
                return j, r
        return None, real(r, tokens[:1], qs[:1], generator)[1] if tokens else r

    monkeypatch.setattr(tree, "try_children", stale)
    counts, _ = node_round_counts(SCHEMES["without_replacement"], 3, 5000, seed=10)
    assert chi2_pvalue(counts, P_NODE.double().numpy()) < 1e-6
