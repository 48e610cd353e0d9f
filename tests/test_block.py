"""Block verification (verifiers/block.py): the rule's law by exact enumeration, the implementation's by χ² over
verify rounds alone, a negative control, and greedy equality; end to end it runs in the contract suite
(`sd` with verifier=block)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import verispec
from verispec.sampling import sample
from verispec.types import Draft
from verispec.verifiers import BlockVerifier, RejectionVerifier
from tests.law import chi2_pvalue, min_detectable_tv, pooled_cells
from tests.test_contract import noisy_copy
from tests.conftest import tiny_llama

V, G = 3, 3  # vocabulary, drafts per block
N_TOKENS = G + 1


class Tables:
    """Context-dependent target and drafter laws over V tokens (seeded Dirichlet), as torch rows."""

    def __init__(self, seed: int):
        g = np.random.default_rng(seed)
        contexts = [c for n in range(G + 1) for c in itertools.product(range(V), repeat=n)]  # every one needed
        self.p = {c: torch.tensor(g.dirichlet(np.full(V, 0.7)), dtype=torch.float32) for c in contexts}
        self.q = {c: torch.tensor(g.dirichlet(np.full(V, 0.7)), dtype=torch.float32) for c in contexts}

    def P(self, ctx):
        return self.p[tuple(ctx)]

    def Q(self, ctx):
        return self.q[tuple(ctx)]

    def target_law(self, n: int) -> np.ndarray:
        law = np.zeros(V ** n)
        for i, seq in enumerate(itertools.product(range(V), repeat=n)):
            law[i] = np.prod([float(self.P(seq[:t])[seq[t]]) for t in range(n)])
        return law


def rounds(verifier, tables: Tables, n: int, seed: int):
    """n rounds: a block of G drafts from the drafter's tables, one verify, then the target's tables to N_TOKENS;
    returns counts over the N_TOKENS-token outcomes and the mean tokens emitted by the round."""
    g = torch.Generator().manual_seed(seed)
    counts, emitted = np.zeros(V ** N_TOKENS), 0
    for _ in range(n):
        x: list[int] = []
        for _ in range(G):
            x.append(sample(tables.Q(x), g))
        q = torch.stack([tables.Q(x[:i]) for i in range(G)])  # (G, V)
        p = torch.stack([tables.P(x[:i]) for i in range(G + 1)])  # (G + 1, V)
        r = verifier.verify(Draft(list(x), q), p, g)
        out = r.emitted(Draft(list(x), q))
        emitted += len(out)
        while len(out) < N_TOKENS:
            out.append(sample(tables.P(out), g))
        counts[int(np.ravel_multi_index(out[:N_TOKENS], (V,) * N_TOKENS))] += 1
    return counts, emitted / n


def block_round_law(tables: Tables, x: list[int]) -> dict[tuple, float]:
    """The rule of Sun et al. (Algorithm 2) written out independently: P(emitted tokens) for draft block x."""
    P = [tables.P(x[:i]).double().numpy() for i in range(G + 1)]
    Q = [tables.Q(x[:i]).double().numpy() for i in range(G)]
    w = [1.0]
    for i in range(G):
        w.append(min(1.0, w[-1] * P[i][x[i]] / Q[i][x[i]]))
    res, h = {G: P[G]}, {G: w[G]}
    for i in range(G):
        d = np.maximum(w[i] * P[i] - Q[i], 0.0)
        res[i] = d / d.sum() if d.sum() > 0 else P[i]
        if i > 0:
            h[i] = d.sum() / (d.sum() + 1 - w[i]) if d.sum() + 1 - w[i] > 0 else 1.0
    out: dict[tuple, float] = {}
    for tau in range(G, -1, -1):
        pr = h[tau] if tau > 0 else 1.0
        for j in range(tau + 1, G + 1):
            pr *= 1 - h[j]
        for y in range(V):
            key = tuple(x[:tau]) + (y,)
            out[key] = out.get(key, 0.0) + pr * res[tau][y]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_rule_is_exact_by_enumeration(seed):
    """Summed over every draft block and every (τ, token) outcome, then continued by the target: exactly the target's
    law of the next G + 1 tokens (no sampling noise), and never fewer expected tokens than token-level."""
    t = Tables(seed)
    law, tokens_per_round = block_law(t)
    np.testing.assert_allclose(law, t.target_law(N_TOKENS), atol=1e-6)
    assert tokens_per_round >= token_tokens_per_round(t) - 1e-9


def block_law(t: Tables) -> tuple[np.ndarray, float]:
    """(the law of the next G + 1 tokens under one block round then the target, expected tokens per round)."""
    law = np.zeros(V ** N_TOKENS)
    tokens_per_round = 0.0
    for x in itertools.product(range(V), repeat=G):
        px = np.prod([float(t.Q(x[:i])[x[i]]) for i in range(G)])
        for s, pr in block_round_law(t, list(x)).items():
            tokens_per_round += px * pr * len(s)
            for tail in itertools.product(range(V), repeat=N_TOKENS - len(s)):
                seq = s + tail
                c = np.prod([float(t.P(seq[:i])[seq[i]]) for i in range(len(s), N_TOKENS)])
                law[int(np.ravel_multi_index(seq, (V,) * N_TOKENS))] += px * pr * c
    return law, tokens_per_round


def token_tokens_per_round(t: Tables) -> float:
    """Expected tokens per round of token-level verification on the same tables."""
    e = 0.0
    for x in itertools.product(range(V), repeat=G):
        px, reach = np.prod([float(t.Q(x[:i])[x[i]]) for i in range(G)]), 1.0
        for i in range(G):
            a = min(1.0, float(t.P(x[:i])[x[i]] / t.Q(x[:i])[x[i]]))
            e += px * reach * (1 - a) * (i + 1)
            reach *= a
        e += px * reach * (G + 1)
    return e


N = 20_000


def test_the_implementation_follows_the_target():
    """The BlockVerifier itself over N verify rounds on seeded tables, against the exact law, and emitting the
    rule's expected number of tokens per round (the token-level verifier its own)."""
    t = Tables(3)
    law = t.target_law(N_TOKENS)
    counts, mean_block = rounds(BlockVerifier(), t, N, seed=1)
    assert chi2_pvalue(counts, law) > 1e-3
    assert abs(mean_block - block_law(t)[1]) < 0.03  # ~4 standard errors at N rounds
    _, mean_token = rounds(RejectionVerifier(), t, N, seed=2)
    assert abs(mean_token - token_tokens_per_round(t)) < 0.03
    assert min_detectable_tv(N, pooled_cells(law, N)) < 0.06


class NoResidual(BlockVerifier):
    """Broken on purpose: block acceptance, but the recovered token drawn from p instead of the block residual."""

    def verify(self, draft, p, generator):
        r = super().verify(draft, p, generator)
        if r.kind == "recovered":
            r.token = sample(p[r.accepted], generator)
        return r


def test_a_recovered_token_without_the_residual_is_detected():
    t = Tables(3)
    counts, _ = rounds(NoResidual(), t, 5000, seed=4)
    assert chi2_pvalue(counts, t.target_law(N_TOKENS)) < 1e-6


def test_greedy_block_verification_equals_ar():
    target = tiny_llama(64, seed=1, scale=20.0)
    drafter = noisy_copy(target, 0.6, 4)
    prompt = [3, 17, 42, 5, 9] * 3
    ar = verispec.generate(target, prompt, max_new_tokens=40).token_ids
    out = verispec.generate(target, prompt, drafter=drafter, gamma=4, max_new_tokens=40, verifier="block")
    assert out.token_ids == ar and 0 < out.stats.accepted < out.stats.drafted
    with pytest.raises(ValueError, match="unknown verifier"):
        verispec.generate(target, prompt, drafter=drafter, max_new_tokens=2, verifier="nope")
