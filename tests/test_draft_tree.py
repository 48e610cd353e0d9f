"""Draft-model token trees (drafters/draft_tree.py): tree shapes, the q each sampled node reports, what is not
expanded, top-k trees, bad options, a depth-3 law test, and a drafter that lies about its draws. End to end with the
verifier (greedy equality and χ² at depth 2 with 2 sampled children per node) it runs in the contract suite as
`sd-tree`."""

from __future__ import annotations

import pytest
import torch

import verispec
from verispec.drafters.children import SCHEMES
from verispec.drafters.draft_tree import DraftTreeDrafter, parse_widths
from verispec.policies import FixedGamma
from verispec.sampling import Sampling
from tests.conftest import tiny_llama
from tests.test_tree import claim_without_replacement
from tests.law import chi2_pvalue, draw, exact_law, job_for, min_detectable_tv, pooled_cells

V = 6
PROMPT = [1, 2, 3, 1, 2]
T1 = Sampling(temperature=1.0)


@pytest.fixture(scope="module")
def models():
    return tiny_llama(V, seed=21, scale=3.0), tiny_llama(V, seed=22, layers=1, hidden=16, scale=3.0)


def grow(drafter: DraftTreeDrafter, gamma: int, sampling=T1, seed: int = 0):
    drafter.prefill(PROMPT)
    return drafter.propose(list(PROMPT), gamma, FixedGamma(gamma), sampling, torch.Generator().manual_seed(seed))


def children_of(draft, a: int) -> list[int]:
    return [i for i, p in enumerate(draft.parents) if p == a]


def test_tree_shape_strings():
    assert parse_widths("3x2x1") == parse_widths("3,2,1") == parse_widths([3, 2, 1]) == (3, 2, 1)
    assert parse_widths(4) == (4,)
    for bad in ("", "3x0", "ax2", "-1", [0]):
        with pytest.raises(ValueError, match="tree must give children per depth"):
            parse_widths(bad)


@pytest.mark.parametrize("bad,match", [({"children": "beam"}, "children must be one of"),
                                       ({"top_k": 0}, "top_k"), ({"nodes": 0}, "nodes"),
                                       ({"tree": "2x0"}, "tree must give")])
def test_bad_options_are_refused(models, bad, match):
    target, drafter = models
    with pytest.raises(ValueError, match=match):
        verispec.generate(target, PROMPT, method="sd-tree", drafter=drafter, max_new_tokens=2, **bad)


@pytest.mark.parametrize("seed", range(5))
def test_without_replacement_tree_has_the_shape_and_reports_what_each_node_was_drawn_from(models, seed):
    d = DraftTreeDrafter(models[1], V, tree="3x2")
    draft = grow(d, 4, seed=seed)
    assert len(draft) == 2  # depth = min(γ, len(widths))
    roots = children_of(draft, -1)
    assert len(roots) == 3
    depth2 = [i for i, p in enumerate(draft.parents) if p >= 0]
    assert all(len(children_of(draft, r)) == 2 for r in roots) and len(depth2) == 6
    assert all(p < i for i, p in enumerate(draft.parents))  # parents before children
    for a in [-1, *roots]:
        kids = children_of(draft, a)
        toks = [draft.tokens[c] for c in kids]
        assert len(set(toks)) == len(toks)  # without replacement: distinct siblings
        base = draft.q[kids[0]]
        assert torch.allclose(base.sum(), torch.tensor(1.0), atol=1e-5)
        for j, c in enumerate(kids):  # child j's q: the first child's with the earlier siblings removed
            expect = base.clone()
            expect[toks[:j]] = 0.0
            assert torch.allclose(draft.q[c], expect / expect.sum(), atol=1e-6)
            assert float(draft.q[c][draft.tokens[c]]) > 0  # a node was drawn from the law it reports


def test_iid_children_report_the_parent_q_and_repeats_are_not_expanded():
    """A peaked drafter repeats i.i.d. draws; a repeated token is never kept by the verifier, so it gets no children."""
    peaked = tiny_llama(V, seed=22, layers=1, hidden=16, scale=30.0)
    seen_repeat = False
    for seed in range(10):
        draft = grow(DraftTreeDrafter(peaked, V, tree="3x2", children="iid"), 2, seed=seed)
        roots = children_of(draft, -1)
        assert len(roots) == 3 and all(torch.equal(draft.q[r], draft.q[roots[0]]) for r in roots)
        first = {}
        for r in roots:
            first.setdefault(draft.tokens[r], r)
        for r in roots:
            assert len(children_of(draft, r)) == (2 if first[draft.tokens[r]] == r else 0)
        seen_repeat |= len(first) < 3
    assert seen_repeat, "the test needs a repeated draw"


def test_stop_tokens_are_not_expanded(models):
    d = DraftTreeDrafter(models[1], V, stop_ids=frozenset(range(V)) - {0}, tree="3x2")  # every token but 0 stops
    draft = grow(d, 2)
    for i, t in enumerate(draft.tokens):
        if draft.parents[i] == -1 and t != 0:
            assert children_of(draft, i) == []
        if draft.parents[i] >= 0:
            assert draft.tokens[draft.parents[i]] == 0


@pytest.mark.parametrize("gamma,top_k,nodes", [(3, 2, 5), (4, 3, 7), (2, 4, 16)])
def test_topk_tree_is_connected_distinct_and_within_nodes(models, gamma, top_k, nodes):
    d = DraftTreeDrafter(models[1], V, children="topk", top_k=top_k, nodes=nodes)
    draft = grow(d, gamma)
    assert draft.q is None  # deterministic children: verified as one-hot drafts
    assert len(draft.tokens) <= min(nodes, top_k * gamma) and len(draft) <= gamma
    assert all(-1 <= p < i for i, p in enumerate(draft.parents))
    for a in [-1, *range(len(draft.tokens))]:
        toks = [draft.tokens[c] for c in children_of(draft, a)]
        assert len(set(toks)) == len(toks)
    # the root's children are the drafter's most likely tokens, best first
    with torch.no_grad():
        logits = models[1](torch.tensor([PROMPT])).logits[0, -1]
    root = [draft.tokens[c] for c in children_of(draft, -1)]
    assert root == logits.topk(len(root)).indices.tolist()


def test_each_level_costs_one_forward_over_its_own_nodes(models):
    """Depth 3: the root's chain forward, then one tree forward per level feeding only that level's nodes (the last
    level is never fed: its nodes are leaves)."""
    d = DraftTreeDrafter(models[1], V, tree="2x2x2")
    draft = grow(d, 3)
    depths = draft.depths()
    # the pending token (twice: the root's chain forward, then the first tree forward, which scores it again), then
    # levels 1 and 2
    fed = 2 + sum(1 for x in depths if x < 3)
    assert d.forwards == 3 and d.tokens_processed == len(PROMPT) - 1 + fed


def test_greedy_always_grows_a_topk_tree(models):
    draft = grow(DraftTreeDrafter(models[1], V, tree="3x2"), 3, sampling=Sampling(temperature=0.0))
    assert draft.q is None and len(draft) == 3


# -- the law at depth 3, and a drafter that lies ---------------------------------------------------------------

N_TOKENS = 4
LAW_N = 6000
SAMPLING = Sampling(temperature=1.0, seed=3)
LAW_V = 4


@pytest.fixture(scope="module")
def law_world():
    target = tiny_llama(LAW_V, seed=11, scale=4.0)
    drafter = tiny_llama(LAW_V, seed=12, layers=1, hidden=16, scale=4.0)
    return target, drafter, exact_law(target, PROMPT, N_TOKENS, SAMPLING)


class IidReportedAsWithoutReplacement(DraftTreeDrafter):
    """Draws children i.i.d. (repeats possible) but reports each one's q as a without-replacement drafter would."""

    def __init__(self, *a, **k):
        super().__init__(*a, children="without_replacement", **k)

        def lie(q, k, generator):
            xs, qs = SCHEMES["iid"](q, k, generator)
            return xs, claim_without_replacement(xs, qs)
        self.draw_children = lie


@pytest.mark.parametrize("children", ["without_replacement", "iid"])
def test_depth_three_trees_follow_the_target(law_world, children):
    """Tree 2x2x2 over 4 generated tokens: the first round drafts 3 levels, so every depth is reached."""
    target, drafter, law = law_world
    job = job_for(target, lambda: DraftTreeDrafter(drafter, LAW_V, tree="2x2x2", children=children),
                  lambda: FixedGamma(3))
    counts, rounds = draw(job, LAW_N, seed=7, n_tokens=N_TOKENS, sampling=SAMPLING, prompt=PROMPT)
    assert rounds.drafted(3) > LAW_N // 5 and rounds.accepted_at(3) > 0 and rounds.rejected_at(3) > 0
    assert chi2_pvalue(counts, law) > 1e-3
    assert min_detectable_tv(LAW_N, pooled_cells(law, LAW_N)) < 0.08


@pytest.mark.parametrize("honest", [True, False])
def test_a_drafter_that_draws_iid_but_claims_without_replacement_is_detected(law_world, honest):
    """A peaked drafter (repeats are common) with 3 x 3 i.i.d. children, 3 tokens: reported honestly the law holds;
    reported as drawn without replacement (a repeat then looks like a fresh token with mass left) it fails."""
    target = law_world[0]
    peaked = tiny_llama(LAW_V, seed=12, layers=1, hidden=16, scale=15.0)
    cls = (lambda m, v, **k: DraftTreeDrafter(m, v, children="iid", **k)) if honest else IidReportedAsWithoutReplacement
    job = job_for(target, lambda: cls(peaked, LAW_V, tree="3x3"), lambda: FixedGamma(2))
    counts, _ = draw(job, 3000, seed=8, n_tokens=3, sampling=SAMPLING, prompt=PROMPT)
    p = chi2_pvalue(counts, exact_law(target, PROMPT, 3, SAMPLING))
    assert p > 1e-3 if honest else p < 1e-6
