"""Traversal verification (verifiers/traversal.py, Weng et al. 2025): exact enumeration of the rule and of the
implementation's own choices on tiny context-dependent tables, for i.i.d., without-replacement and deterministic
(top-k) trees; χ² of the implementation over seeded rounds with the repo's own child drafters; negative controls that
must fail; greedy (one-hot p) keeps the longest argmax path; and on average at least as many tokens kept as the
token-level tree rule (`verify_tree`) on the same trees."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from tests.law import chi2_pvalue, min_detectable_tv, pooled_cells
from verispec.drafters.children import SCHEMES
from verispec.sampling import sample
from verispec.types import Draft
from verispec.verifiers.block import BlockVerifier
from verispec.verifiers.traversal import TraversalVerifier
from verispec.verifiers.tree import verify_tree

V = 3  # vocabulary
MAX_DEPTH = 3


class Tables:
    """Context-dependent target and drafter laws over V tokens (seeded Dirichlet), float64 torch rows; a context is
    the tuple of tokens after the pending one."""

    def __init__(self, seed: int, alpha: float = 0.7):
        g = np.random.default_rng(seed)
        contexts = [c for n in range(MAX_DEPTH + 1) for c in itertools.product(range(V), repeat=n)]
        self.p = {c: torch.tensor(g.dirichlet(np.full(V, alpha)), dtype=torch.float64) for c in contexts}
        self.q = {c: torch.tensor(g.dirichlet(np.full(V, alpha)), dtype=torch.float64) for c in contexts}

    def P(self, ctx):
        return self.p[tuple(ctx)]

    def Q(self, ctx):
        return self.q[tuple(ctx)]

    def target_law(self, n: int) -> np.ndarray:
        return np.array([self.prefix_mass(seq) for seq in itertools.product(range(V), repeat=n)])

    def prefix_mass(self, seq) -> float:
        return float(np.prod([float(self.P(seq[:t])[seq[t]]) for t in range(len(seq))]))

    def law_of(self, emitted: dict[tuple, float], n: int) -> np.ndarray:
        """The law of the next n tokens when a round emits prefix s with probability emitted[s] and the target
        continues it."""
        law = np.zeros(V ** n)
        for s, pr in emitted.items():
            for tail in itertools.product(range(V), repeat=n - len(s)):
                seq = s + tail
                c = np.prod([float(self.P(seq[:t])[seq[t]]) for t in range(len(s), n)])
                law[int(np.ravel_multi_index(seq, (V,) * n))] += pr * c
        return law


# -- drafted trees, enumerated with their probabilities ------------------------------------------------------------

def child_options(q: torch.Tensor, k: int, scheme: str):
    """Every way one node's k children can be drawn: [(probability, tokens, the row each child reports)].

    iid: k independent draws from q, each reporting q. without_replacement: sequential draws from q with the earlier
    ones removed and renormalised, each reporting that renormalised law. iid_as_wr: drawn i.i.d. but reported as
    without replacement (a broken drafter). topk: the k most likely tokens of q, deterministic (rows None)."""
    qn = q.tolist()
    if scheme == "topk":
        order = sorted(range(V), key=lambda t: (-qn[t], t))[:k]
        return [(1.0, order, None)]
    out = []
    for xs in itertools.product(range(V), repeat=k):
        if scheme == "without_replacement" and len(set(xs)) < k:
            continue
        pr, rows, left = 1.0, [], q.clone()
        for x in xs:
            if scheme == "without_replacement":
                pr *= float(left[x]) / float(left.sum())
                rows.append(left / left.sum())
                left = left.clone()
                left[x] = 0.0
            else:
                pr *= qn[x]
                if scheme == "iid":
                    rows.append(q)
                else:  # iid_as_wr
                    rows.append(left / left.sum())
                    left = left.clone()
                    left[x] = 0.0
        out.append((pr, list(xs), rows))
    return out


def enumerate_trees(t: Tables, widths: tuple[int, ...], scheme: str, expand_repeats: bool = False):
    """Every drafted tree with its probability: [(probability, Draft)]. Grown level by level as
    verispec.drafters.draft_tree does (parents before children, siblings in draw order); a token repeating an
    earlier sibling is not expanded unless expand_repeats."""
    out = []

    def grow(d, tokens, parents, rows, ctxs, frontier, pr):
        if d == len(widths) or not frontier:
            q = None if scheme == "topk" else torch.stack(rows)  # (K, V)
            out.append((pr, Draft(list(tokens), q, "enum", parents=list(parents))))
            return
        per_node = [child_options(t.Q(ctxs[f] if f >= 0 else ()), widths[d], scheme) for f in frontier]
        for combo in itertools.product(*per_node):
            tk, pa, rw, cx, nxt, p2 = list(tokens), list(parents), list(rows), list(ctxs), [], pr
            for f, (pc, xs, rs) in zip(frontier, combo):
                p2 *= pc
                seen = set()
                for j, x in enumerate(xs):
                    tk.append(x)
                    pa.append(f)
                    rw.append(None if rs is None else rs[j])
                    cx.append((ctxs[f] if f >= 0 else ()) + (x,))
                    if expand_repeats or x not in seen:
                        nxt.append(len(tk) - 1)
                    seen.add(x)
            grow(d + 1, tk, pa, rw, cx, nxt, p2)

    grow(0, [], [], [], [], [-1], 1.0)
    return out


def target_rows(t: Tables, draft: Draft) -> torch.Tensor:
    """(1 + K, V): the target's law at the pending token and after each node."""
    ctxs: list[tuple] = []
    for x, a in zip(draft.tokens, draft.parents):
        ctxs.append((ctxs[a] if a >= 0 else ()) + (x,))
    return torch.stack([t.P(())] + [t.P(c) for c in ctxs])


def rows_of(draft: Draft) -> np.ndarray:
    """(K, V) what each node was drawn from (one-hot for deterministic nodes)."""
    if draft.q is not None:
        return draft.q.double().numpy()
    return np.eye(V)[draft.tokens]


def children_of(draft: Draft) -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for i, a in enumerate(draft.parents):
        kids.setdefault(a, []).append(i)
    return kids


# -- the rule, written out in numpy from the paper's description (independently of verifiers/traversal.py) --------

def rule_law(draft: Draft, P: np.ndarray) -> dict[tuple, float]:
    """{(accepted path, new token): probability} of traversal verification on one drafted tree, by propagating
    probabilities through the post-order walk: each subtree returns what it accepts and the probability that its
    root is deleted."""
    Q, kids = rows_of(draft), children_of(draft)

    def subtree(X, p_alpha, M_b):
        accepted: dict[tuple, float] = {}
        reach = 1.0  # P(the walk is still inside X's subtree with every child so far deleted)
        for c in kids.get(X, []):
            x, M_s = draft.tokens[c], Q[c]
            below, deleted = subtree(c, min(1.0, p_alpha * M_b[x] / M_s[x]), P[c + 1])
            for (path, y), pr in below.items():
                accepted[((c,) + path, y)] = accepted.get(((c,) + path, y), 0.0) + reach * pr
            reach *= deleted
            d = np.maximum(p_alpha * M_b - M_s, 0.0)
            S = d.sum()
            M_b = d / S if S > 0 else M_b
            p_alpha = S / (S + 1.0 - p_alpha) if S + 1.0 - p_alpha > 0 else 1.0
        keep = 1.0 if X < 0 else p_alpha  # the pending token is never deleted
        for y in range(V):
            if M_b[y] > 0:
                accepted[((), y)] = accepted.get(((), y), 0.0) + reach * keep * M_b[y]
        return accepted, reach * (1.0 - keep)

    return subtree(-1, 1.0, P[0])[0]


def token_level_mean_accepted(draft: Draft, P: np.ndarray) -> float:
    """Expected drafts kept by the token-level tree rule (verify_tree: top-down, min(1, r/q) per child, r ← the
    residual after a rejection)."""
    Q, kids = rows_of(draft), children_of(draft)

    def below(X):
        r, reach, e = P[X + 1], 1.0, 0.0
        for c in kids.get(X, []):
            x = draft.tokens[c]
            a = min(1.0, r[x] / Q[c][x])
            e += reach * a * (1.0 + below(c))
            reach *= 1.0 - a
            d = np.maximum(r - Q[c], 0.0)
            r = d / d.sum() if d.sum() > 0 else r
        return e

    return below(-1)


# -- the implementation's own law, by enumerating its random choices ------------------------------------------------

class Replay:
    """Mixin over a TraversalVerifier: makes its two random choices from a forced prefix (then the first option),
    recording every choice's options, so that all runs can be enumerated with their probabilities."""

    def __init__(self, forced: tuple[int, ...]):
        self.forced, self.trace = forced, []

    def _choose(self, options):
        i = len(self.trace)
        k = self.forced[i] if i < len(self.forced) else 0
        self.trace.append((len(options), options[k][1]))
        return options[k][0]

    def _accept(self, p_alpha, generator):
        return self._choose([(v, pr) for v, pr in ((True, p_alpha), (False, 1.0 - p_alpha)) if pr > 0])

    def _draw(self, M_b, generator):
        m = M_b.tolist()
        return self._choose([(y, w / sum(m)) for y, w in enumerate(m) if w > 0])


def implementation_law(cls, draft: Draft, p: torch.Tensor) -> dict[tuple, float]:
    """{(accepted path, new token): probability} of cls.verify on one tree, every run of its choices enumerated."""
    replay = type("Replayed" + cls.__name__, (Replay, cls), {})
    law: dict[tuple, float] = {}
    todo: list[tuple[int, ...]] = [()]
    while todo:
        forced = todo.pop()
        v = replay(forced)
        r = v.verify(draft, p, None)
        key = (tuple(r.path), r.token)
        law[key] = law.get(key, 0.0) + float(np.prod([pr for _, pr in v.trace]))
        chosen = list(forced) + [0] * (len(v.trace) - len(forced))
        for i in range(len(forced), len(v.trace)):  # branch on every choice made beyond the forced prefix
            todo.extend(tuple(chosen[:i]) + (k,) for k in range(1, v.trace[i][0]))
    return law


def emitted(draft: Draft, outcomes: dict[tuple, float], weight: float, into: dict[tuple, float]) -> float:
    """Adds weight · P(emitted tokens) to `into`; returns weight · the expected drafts kept."""
    mean = 0.0
    for (path, y), pr in outcomes.items():
        s = tuple(draft.tokens[i] for i in path) + (y,)
        into[s] = into.get(s, 0.0) + weight * pr
        mean += weight * pr * len(path)
    return mean


SHAPES = [  # (scheme, widths, expand repeats): depth >= 2, >= 2 sampled children per node somewhere
    ("iid", (2, 2), False),
    ("iid", (2, 2), True),
    ("without_replacement", (2, 2), False),
    ("without_replacement", (3, 1), False),
    ("topk", (2, 2), False),
    ("topk", (3, 2, 2), False),
    ("iid", (2, 1, 1), False),
]


@pytest.mark.parametrize("scheme, widths, expand_repeats", SHAPES)
def test_the_rule_is_exact_by_enumeration(scheme, widths, expand_repeats):
    """Summed over every drafted tree and every verify outcome, then continued by the target: exactly the target's
    law of the next depth + 1 tokens (to 1e-9, no sampling noise), for the numpy rule and — on every tree, to
    1e-12 — for the implementation's own choices; and at least as many drafts kept on average as verify_tree."""
    n = len(widths) + 1
    for seed in (0, 1):
        t = Tables(seed)
        rule, impl = {}, {}
        mean_traversal = mean_token = 0.0
        trees = enumerate_trees(t, widths, scheme, expand_repeats)
        assert abs(sum(pr for pr, _ in trees) - 1.0) < 1e-12
        for pr, draft in trees:
            p = target_rows(t, draft)  # (1 + K, V)
            ref = rule_law(draft, p.numpy())
            mine = implementation_law(TraversalVerifier, draft, p)
            assert all(abs(ref.get(k, 0.0) - mine.get(k, 0.0)) < 1e-12 for k in ref.keys() | mine.keys())
            mean_traversal += emitted(draft, ref, pr, rule)
            emitted(draft, mine, pr, impl)
            mean_token += pr * token_level_mean_accepted(draft, p.numpy())
        target = t.target_law(n)
        np.testing.assert_allclose(t.law_of(rule, n), target, rtol=0, atol=1e-9)
        np.testing.assert_allclose(t.law_of(impl, n), target, rtol=0, atol=1e-9)
        assert mean_traversal >= mean_token - 1e-12, (seed, mean_traversal, mean_token)


def test_on_a_chain_it_is_block_verification():
    """A chain given as a tree (parents 0, 1, ...) goes through the traversal walk; its outcome law equals block
    verification's (Sun et al., written out in tests/test_block.py) on every drafted chain."""
    from tests.test_block import G, block_round_law
    from tests.test_block import Tables as BlockTables

    t = BlockTables(5)
    for x in itertools.product(range(V), repeat=G):
        x = list(x)
        q = torch.stack([t.Q(x[:i]) for i in range(G)]).double()  # (G, V)
        p = torch.stack([t.P(x[:i]) for i in range(G + 1)]).double()  # (G + 1, V)
        d = Draft(x, q, "chain", parents=list(range(-1, G - 1)))
        mine: dict[tuple, float] = {}
        emitted(d, implementation_law(TraversalVerifier, d, p), 1.0, mine)
        block = block_round_law(t, x)
        # test_block's tables are float32: its rows sum to 1 within ~1e-8, which `sample` renormalises and the
        # written-out law does not
        assert all(abs(mine.get(k, 0.0) - block.get(k, 0.0)) < 1e-7 for k in mine.keys() | block.keys())


class RecoveredFromTarget(TraversalVerifier):
    """Broken on purpose: traversal acceptance, but the recovered token drawn from the target's row at the accepted
    node instead of its residual M_b."""

    def verify(self, draft, p, generator):
        r = super().verify(draft, p, generator)
        if r.kind == "recovered":
            r.token = self._draw(p[r.path[-1] + 1 if r.path else 0].double(), generator)
        return r


@pytest.mark.parametrize("cls, scheme", [(RecoveredFromTarget, "without_replacement"),
                                        (TraversalVerifier, "iid_as_wr")])
def test_broken_variants_are_lossy_by_enumeration(cls, scheme):
    """The same enumeration detects a wrong residual and i.i.d. siblings reported as drawn without replacement."""
    t = Tables(0)
    law: dict[tuple, float] = {}
    for pr, draft in enumerate_trees(t, (2, 2), scheme):
        emitted(draft, implementation_law(cls, draft, target_rows(t, draft)), pr, law)
    assert np.abs(t.law_of(law, 3) - t.target_law(3)).max() > 1e-3


# -- the implementation over seeded rounds -------------------------------------------------------------------------

WIDTHS = (2, 2)
N_TOKENS = len(WIDTHS) + 1


def draft_tree(t: Tables, scheme: str, g: torch.Generator, report=None) -> Draft:
    """One tree drawn with the repo's child drafters (verispec.drafters.children), level by level, repeats not
    expanded (as verispec.drafters.draft_tree). `report` rewrites the rows a node's children claim."""
    tokens, parents, rows, ctxs, frontier = [], [], [], [], [-1]
    for w in WIDTHS:
        nxt = []
        for f in frontier:
            xs, qs = SCHEMES[scheme](t.Q(ctxs[f] if f >= 0 else ()), w, g)
            qs = report(xs, qs) if report else qs
            seen: set[int] = set()
            for x, q in zip(xs, qs):
                tokens.append(x)
                parents.append(f)
                rows.append(q)  # (V,)
                ctxs.append((ctxs[f] if f >= 0 else ()) + (x,))
                if x not in seen:
                    nxt.append(len(tokens) - 1)
                seen.add(x)
        frontier = nxt
    return Draft(tokens, torch.stack(rows), scheme, parents=parents)


def rounds(verifier, t: Tables, scheme: str, n: int, seed: int, report=None):
    """n rounds: a tree from the drafter's tables, one verify, then the target's tables to N_TOKENS; returns counts
    over the N_TOKENS-token outcomes and the mean drafts kept."""
    g = torch.Generator().manual_seed(seed)
    counts, kept = np.zeros(V ** N_TOKENS), 0
    for _ in range(n):
        d = draft_tree(t, scheme, g, report)
        r = verifier(d, target_rows(t, d), g)
        out = r.emitted(d)
        kept += r.accepted
        while len(out) < N_TOKENS:
            out.append(sample(t.P(out), g))
        counts[int(np.ravel_multi_index(out[:N_TOKENS], (V,) * N_TOKENS))] += 1
    return counts, kept / n


def exact_means(t: Tables, scheme: str) -> tuple[float, float]:
    """(traversal, token-level) expected drafts kept per round on the WIDTHS trees, by enumeration."""
    m_tr = m_tok = 0.0
    for pr, d in enumerate_trees(t, WIDTHS, scheme):
        P = target_rows(t, d).numpy()
        m_tr += emitted(d, rule_law(d, P), pr, {})
        m_tok += pr * token_level_mean_accepted(d, P)
    return m_tr, m_tok


N = 12_000


@pytest.mark.parametrize("scheme", ["iid", "without_replacement"])
def test_the_implementation_follows_the_target(scheme):
    """TraversalVerifier over N rounds of trees drawn by the repo's child drafters, against the exact law; it and
    verify_tree each keep their enumerated expected number of drafts, traversal's the larger (exact: 1.523 vs 1.410
    with i.i.d. children, 1.958 vs 1.921 without replacement). n = 12000 rounds, 26 cells after pooling: min
    detectable TV 0.031 (α = 0.001, power 0.9)."""
    t = Tables(0)
    law = t.target_law(N_TOKENS)
    counts, mean_tr = rounds(TraversalVerifier().verify, t, scheme, N, seed=1)
    assert chi2_pvalue(counts, law) > 1e-3
    _, mean_tok = rounds(verify_tree, t, scheme, N, seed=2)
    exact_tr, exact_tok = exact_means(t, scheme)
    assert abs(mean_tr - exact_tr) < 0.04 and abs(mean_tok - exact_tok) < 0.04  # ~5 standard errors
    assert exact_tr > exact_tok
    assert min_detectable_tv(N, pooled_cells(law, N)) < 0.035


def test_a_recovered_token_without_the_residual_is_detected():
    t = Tables(1)  # total variation of the broken law from the target's, by enumeration: 0.12
    counts, _ = rounds(RecoveredFromTarget().verify, t, "without_replacement", 3000, seed=4)
    assert chi2_pvalue(counts, t.target_law(N_TOKENS)) < 1e-3


def test_iid_children_reported_as_drawn_without_replacement_are_detected():
    from tests.test_tree import claim_without_replacement

    t = Tables(1)  # total variation of the broken law from the target's, by enumeration: 0.16
    counts, _ = rounds(TraversalVerifier().verify, t, "iid", 3000, seed=5, report=claim_without_replacement)
    assert chi2_pvalue(counts, t.target_law(N_TOKENS)) < 1e-3


# -- greedy, chains, edge cases ------------------------------------------------------------------------------------

def random_tree(g: np.random.Generator, vocab: int, nodes: int):
    """Random tree with distinct sibling tokens: (tokens, parents)."""
    tokens, parents = [], []
    for _ in range(nodes):
        a = int(g.integers(-1, len(tokens))) if tokens else -1
        used = {tokens[i] for i in range(len(tokens)) if parents[i] == a}
        free = [x for x in range(vocab) if x not in used]
        if not free:
            continue
        tokens.append(int(g.choice(free)))
        parents.append(a)
    return tokens, parents


@pytest.mark.parametrize("sampled_q", [False, True])
def test_greedy_keeps_the_longest_argmax_path(sampled_q):
    """One-hot p: the kept path is the longest one whose every token is the target's argmax after its parent, and the
    new token is the argmax after it (the same as verify_tree), with deterministic or sampled q rows."""
    g = np.random.default_rng(0)
    vocab = 4
    for case in range(300):
        tokens, parents = random_tree(g, vocab, int(g.integers(1, 12)))
        K = len(tokens)
        best = g.integers(0, vocab, size=K + 1)  # argmax of row 0 (pending token) and of row 1 + i
        best[1:] = np.where(g.random(K) < 0.7, [tokens[i] for i in g.integers(0, K, size=K)], best[1:])
        p = torch.zeros(K + 1, vocab, dtype=torch.float64)
        p[torch.arange(K + 1), torch.tensor(best)] = 1.0
        q = torch.tensor(g.dirichlet(np.ones(vocab), size=K)) if sampled_q else None  # (K, V)
        d = Draft(tokens, q, "greedy", parents=parents)
        path, at = [], -1
        while True:  # siblings are distinct: at most one child matches
            nxt = [i for i in range(K) if parents[i] == at and tokens[i] == best[at + 1]]
            if not nxt:
                break
            at = nxt[0]
            path.append(at)
        r = TraversalVerifier().verify(d, p, torch.Generator().manual_seed(case))
        assert r.path == path and r.accepted == len(path) and r.token == best[(path[-1] + 1) if path else 0]
        assert r.kind == ("recovered" if any(a == at for a in parents) else "bonus")
        t = verify_tree(d, p, torch.Generator().manual_seed(case))
        assert (t.path, t.token, t.kind) == (r.path, r.token, r.kind)


def test_chains_and_empty_drafts():
    """A chain (parents None) is block verification, draw for draw; an empty tree emits one target token; side
    nodes are not verified."""
    t = Tables(2)
    for seed in range(20):
        x = [seed % V, (seed // V) % V]
        q = torch.stack([t.Q(x[:i]) for i in range(2)])  # (2, V)
        p = torch.stack([t.P(x[:i]) for i in range(3)])  # (3, V)
        a = TraversalVerifier().verify(Draft(list(x), q), p, torch.Generator().manual_seed(seed))
        b = BlockVerifier().verify(Draft(list(x), q), p, torch.Generator().manual_seed(seed))
        assert (a.accepted, a.token, a.kind) == (b.accepted, b.token, b.kind)
    r = TraversalVerifier().verify(Draft([], None, parents=[]), t.P(()).unsqueeze(0), torch.Generator().manual_seed(0))
    assert (r.accepted, r.path, r.kind) == (0, [], "bonus")
    d = Draft([1, 2], None, parents=[-1, 0], side_tokens=[0, 1], side_parents=[-1, 2])
    p = torch.zeros(3, V, dtype=torch.float64)
    p[0, 1] = p[1, 2] = p[2, 0] = 1.0
    r = TraversalVerifier().verify(d, p, torch.Generator().manual_seed(0))
    assert r.path == [0, 1] and r.emitted(d) == [1, 2, 0] and r.kind == "bonus"


def test_greedy_tree_decoding_equals_ar():
    """End to end through the engine: the draft-model tree drafter (EAGLE-2 top-k trees under greedy) verified by
    traversal verification gives the target's greedy text."""
    import verispec
    from tests.conftest import tiny_llama
    from verispec.cache import CachedLM
    from verispec.drafters.draft_tree import DraftTreeDrafter
    from verispec.engine import decode
    from verispec.policies import FixedGamma
    from verispec.sampling import Sampling

    target = tiny_llama(64, seed=1, scale=20.0)
    noisy = tiny_llama(64, seed=1, scale=20.0)  # the target with a perturbed output layer: agrees often, not always
    with torch.no_grad():
        noisy.lm_head.weight.add_(torch.randn(noisy.lm_head.weight.shape, generator=torch.Generator().manual_seed(4))
                                  * 0.6)
    drafter = DraftTreeDrafter(noisy, 64, top_k=3, nodes=8)
    prompt = [3, 17, 42, 5, 9] * 3
    ar = verispec.generate(target, prompt, max_new_tokens=40).token_ids
    ids, stats = decode(CachedLM(target), drafter, TraversalVerifier(), FixedGamma(3), prompt, max_new_tokens=40,
                        sampling=Sampling(), stop_ids=frozenset(), method="sd-tree")
    assert ids == ar and 0 < stats.accepted < stats.drafted  # drafts kept and drafts rejected
