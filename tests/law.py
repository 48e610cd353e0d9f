"""Reference laws and χ² machinery for the sampling-distribution tests (a helper module: no tests here).

Speculative sampling (Leviathan et al. 2023, Algorithm 1; Chen et al. 2023) is lossless: the tokens it emits follow
the target's law p = transform(target logits) exactly, whatever the drafter proposes, as long as each draft x_i
comes with the q_i it was sampled from. The tests check that end to end, by comparing counts of whole generations
with the exact joint law of those tokens. Everything the reference needs is computed here independently of the
code under test:

- `probs` / `warp`: the sampling transform (temperature, top-k, top-p, greedy) in numpy, written from the definitions (the
  rules of transformers' TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper, ties included), not by
  calling verispec.sampling or transformers;
- `exact_law`: the joint law of the next n tokens, from raw logits of plain full forwards (no KV cache);
- `chi2_pvalue` and `min_detectable_tv`: the test and its power;
- `draw`: n end-to-end generations through `verispec.engine.decode`, split into fixed seeded chunks that run on
  forked worker processes (bit-identical to running them inline).
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy import optimize, stats

PROMPT = [1]  # one token: no prefill forwards (a fifth of a short generation's cost)

# ---------------------------------------------------------------------------------------------------------------
# The sampling transform, from the definitions


def probs(logits, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """(N, V) raw logits -> (N, V) float64 sampling probabilities.

    temperature 0 is greedy: one-hot on the argmax of the raw logits (the first one on ties, as torch.argmax).
    Otherwise softmax(warp(logits)): see `warp`.
    """
    z = np.atleast_2d(np.asarray(logits, dtype=np.float64))  # (N, V)
    if temperature == 0:
        out = np.zeros_like(z)  # (N, V)
        out[np.arange(len(z)), z.argmax(-1)] = 1.0
        return out
    z = warp(z, temperature, top_k, top_p)[0]  # (N, V)
    e = np.exp(z - z.max(-1, keepdims=True))  # (N, V)
    return e / e.sum(-1, keepdims=True)


def warp(z: np.ndarray, temperature: float, top_k: int, top_p: float) -> tuple[np.ndarray, float]:
    """HF's warpers in HF's order on (N, V) float64 logits; returns (warped logits, -inf = removed; top-p margin).

    Temperature: z / T. Top-k: keep every token whose z >= the k-th largest z, so ties at the boundary are all kept
    (TopKLogitsWarper removes `scores < topk(scores, k)[..., -1]`, strictly smaller only). Top-p (TopPLogitsWarper):
    sort ascending, c = cumulative softmax, remove tokens with c <= 1 - top_p, always keep the largest. Tied logits
    straddling the top-p boundary are split by the sort order; we sort stably (the lower id comes first and goes
    first), which is what torch's CPU sort does for V <= 16; above that its unstable sort orders ties its own way,
    so exact top-p ties are comparable on small vocabularies only. The margin is the smallest |c - (1 - top_p)|
    over the tokens the comparison decided (inf without top-p): near 0, fp32 and fp64 could pick different sets.
    """
    z = z / temperature  # (N, V)
    if top_k:
        kth = -np.sort(-z, axis=-1)[:, min(top_k, z.shape[-1]) - 1]  # (N,) the k-th largest
        z = np.where(z < kth[:, None], -np.inf, z)  # (N, V)
    if top_p >= 1.0:
        return z, np.inf
    order = np.argsort(z, axis=-1, kind="stable")  # (N, V) ascending
    zs = np.take_along_axis(z, order, -1)  # (N, V)
    e = np.exp(zs - zs[:, -1:])  # (N, V); the largest is last and finite
    c = np.cumsum(e / e.sum(-1, keepdims=True), -1)  # (N, V) cumulative softmax, ascending
    remove_sorted = c <= 1 - top_p  # (N, V)
    remove_sorted[:, -1] = False  # min_tokens_to_keep = 1
    remove = np.zeros_like(remove_sorted)  # (N, V)
    np.put_along_axis(remove, order, remove_sorted, -1)
    decided = np.isfinite(zs)[:, :-1]  # (N, V-1); top-k's -inf tokens have c = 0 exactly
    margin = np.abs(c[:, :-1] - (1 - top_p))[decided]
    return np.where(remove, -np.inf, z), float(margin.min()) if margin.size else np.inf


def probs_for(logits, sampling) -> np.ndarray:
    """`probs` with the settings of a verispec Sampling (only its fields are read)."""
    return probs(logits, sampling.temperature, sampling.top_k, sampling.top_p)


# ---------------------------------------------------------------------------------------------------------------
# The exact joint law


@torch.no_grad()
def exact_law(target_model: torch.nn.Module, prompt: list[int], n_tokens: int, sampling) -> np.ndarray:
    """P(t_1 .. t_n | prompt) under the target and the sampling transform. (V**n,) float64.

    Cell index = Σ_i t_i V^(n-1-i) (t_1 most significant), as `draw` counts. For each length j < n one batched,
    cache-free forward over all V^j continuations of the prompt gives p(· | prompt, prefix) (V^j, V); the joint law
    is the product of these conditionals. Raises if a top-p decision sits within 1e-5 of its threshold (fp32 in the
    engine vs fp64 here could then pick different supports; change the prompt or seed).
    """
    V = int(target_model.get_output_embeddings().weight.shape[0])
    law = np.ones(1)  # (V^j,)
    for j in range(n_tokens):
        prefixes = [list(prompt) + list(t) for t in itertools.product(range(V), repeat=j)]  # lexicographic
        logits = target_model(torch.tensor(prefixes)).logits[:, -1].double().numpy()  # (V^j, V)
        if sampling.temperature:
            margin = warp(logits, sampling.temperature, sampling.top_k, sampling.top_p)[1]
            if margin < 1e-5:
                raise ValueError(f"a top-p decision is within {margin:.1e} of its threshold at depth {j}")
        p = probs_for(logits, sampling)  # (V^j, V)
        law = (law[:, None] * p).reshape(-1)  # (V^(j+1),)
    return law / law.sum()


# ---------------------------------------------------------------------------------------------------------------
# The test and its power


def pool(law: np.ndarray, n: int) -> np.ndarray:
    """Cell -> test cell: cells with expected count n·law < 5 are pooled into one extra cell (and, if that pool
    still expects < 5, the smallest kept cells join it) so the χ² approximation holds. (cells,) int."""
    exp = law * n
    small = exp < 5
    if 0 < exp[small].sum() < 5:
        for i in np.argsort(exp):
            if exp[small].sum() >= 5:
                break
            small[i] = True
    kept = np.flatnonzero(~small)
    cell = np.full(law.shape, len(kept))
    cell[kept] = np.arange(len(kept))
    return cell


def pooled_cells(law: np.ndarray, n: int) -> int:
    """How many cells the χ² test over n draws has after pooling (a pool of impossible sequences is no cell)."""
    return int((np.bincount(pool(law, n), weights=law) > 0).sum())


def chi2_pvalue(counts: np.ndarray, law: np.ndarray) -> float:
    """Pearson χ² p-value of `counts` (n draws over the cells of `law`) against `law`, sparse cells pooled; 0 when a
    sequence of probability 0 was drawn."""
    if counts[law == 0].any():
        return 0.0  # a sequence the target never emits was sampled: no law with these zeros fits
    n = int(counts.sum())
    cell = pool(law, n)
    obs = np.bincount(cell, weights=counts)  # (m,)
    exp = np.bincount(cell, weights=law) * n  # (m,)
    obs, exp = obs[exp > 0], exp[exp > 0]
    return float(stats.chisquare(obs, exp * (obs.sum() / exp.sum())).pvalue)


def min_detectable_tv(n: int, cells: int, alpha: float = 1e-3, power: float = 0.9) -> float:
    """The smallest total-variation bias δ that a level-α Pearson χ² test over `cells` cells and n draws detects
    with probability >= `power`, whatever its shape.

    If the draws follow q instead of the reference p (on the test's cells), Pearson's X² is asymptotically
    noncentral χ² with df = cells - 1 and noncentrality λ = n Σ_i (q_i - p_i)² / p_i (n times the χ²-divergence).
    By Cauchy–Schwarz, (Σ_i |q_i - p_i|)² = (Σ_i |q_i - p_i| / √p_i · √p_i)² <= Σ_i (q_i - p_i)² / p_i · Σ_i p_i,
    and Σ_i |q_i - p_i| = 2 TV(p, q), so λ >= 4 n δ² whenever TV >= δ. The power P(X² > χ²_{df, 1-α}) increases
    with λ, so every bias of TV >= δ is detected with at least the power of λ* = 4 n δ², where λ* solves
    P(ncx2(df, λ*) > χ²_{df, 1-α}) = power; δ = √(λ* / 4n). The bound is the worst case (a bias spread in proportion
    to p); concentrated biases are detected far below it. δ is measured on the test's cells: a bias that moves mass
    only inside the pooled cell is invisible to the test.
    """
    df = cells - 1
    crit = stats.chi2.isf(alpha, df)
    lam = optimize.brentq(lambda lam: stats.ncx2.sf(crit, df, lam) - power, 1e-9, 1e6)
    return float(np.sqrt(lam / (4 * n)))


def stated(label: str, n: int, cells: int, alpha: float = 1e-3) -> str:
    """The power line a χ² test's docstring carries (and a test checks): `label` n, cells and the worst-case δ."""
    return (f"{label}n = {n} draws, {cells} cells: min detectable TV {min_detectable_tv(n, cells, alpha):.3f} "
            f"(α = {alpha:g}, power 0.9)")


# ---------------------------------------------------------------------------------------------------------------
# Parallel draws

CHUNKS = 4  # fixed, so the same (seed, n) gives the same draws whatever the number of workers


@dataclass
class Rounds:
    """What the rounds of the draws drafted: rounds[c, k, a] = rounds whose draft the engine capped at c tokens (the
    budget left minus one), that drafted k tokens (len(draft): a chain's length, a tree's depth) and kept a of
    them. `first` counts the first round of each generation only (cap n_tokens - 1)."""

    rounds: np.ndarray  # (L, L, L)
    first: np.ndarray  # (L, L) first rounds by [drafted, accepted]

    @property
    def table(self) -> np.ndarray:
        """[k, a]: rounds that drafted k tokens and kept a of them. (L, L)"""
        return self.rounds.sum(0)

    @property
    def lengths(self) -> np.ndarray:
        """Rounds by how many tokens they drafted. (L,)"""
        return self.rounds.sum((0, 2))

    def drafted(self, k: int) -> int:
        """Rounds that drafted at least k tokens (reached draft position k, 1-based)."""
        return int(self.table[k:].sum())

    def accepted_at(self, k: int) -> int:
        """Rounds whose k-th draft was kept."""
        return int(self.table[:, k:].sum())

    def rejected_at(self, k: int) -> int:
        """Rounds whose k-th draft was drafted and rejected (the first k - 1 were kept)."""
        return int(self.table[k:, k - 1].sum())

    def lengths_at_cap(self, c: int) -> set[int]:
        """The distinct draft lengths of rounds capped at c: more than one means something other than the budget
        (the policy, or a drafter that stops) chose them."""
        return {int(k) for k in np.flatnonzero(self.rounds[c].sum(1))}


Job = Callable[[], tuple]  # () -> (CachedLM target, drafter, verifier, policy): fresh objects for one chunk


def job_for(target_model: torch.nn.Module, drafter: Callable, policy: Callable,
            verifier: Callable | None = None) -> Job:
    """The usual job: a CachedLM over `target_model` plus drafter(), policy() and verifier() (zero-argument
    factories; the verifier defaults to RejectionVerifier)."""
    from verispec.cache import CachedLM
    from verispec.verifiers import RejectionVerifier

    verifier = verifier or RejectionVerifier
    return lambda: (CachedLM(target_model), drafter(), verifier(), policy())

_JOB: dict | None = None  # the draw in progress, inherited by forked workers (never pickled)


def _chunk_seed(seed: int, chunk: int) -> int:
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1, np.uint64)[0] >> 1)


def _run_chunk(chunk: int) -> tuple[np.ndarray, Counter, Counter]:
    from verispec.engine import decode

    d = _JOB
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same arithmetic inline and in a worker, and no OpenMP pool in a forked child
    try:
        target, drafter, verifier, policy = d["job"]()
        V = target.vocab_size
        n = d["n"] // CHUNKS + (chunk < d["n"] % CHUNKS)
        g = torch.Generator().manual_seed(_chunk_seed(d["seed"], chunk))
        weights = V ** np.arange(d["n_tokens"] - 1, -1, -1)  # (n_tokens,) t_1 most significant
        counts = np.zeros(V ** d["n_tokens"], dtype=np.int64)
        every, first = Counter(), Counter()
        for _ in range(n):
            ids, st = decode(target, drafter, verifier, policy, d["prompt"], max_new_tokens=d["n_tokens"],
                             sampling=d["sampling"], stop_ids=d["stop_ids"], method="law", generator=g)
            assert len(ids) == d["n_tokens"], f"generation stopped after {len(ids)} tokens"
            counts[int(np.dot(ids, weights))] += 1
            left = d["n_tokens"]
            for s in st.steps:  # the engine caps each round's draft at (tokens still to generate) - 1
                every[(left - 1, s.drafted, s.accepted)] += 1
                left -= s.emitted
            first[(st.steps[0].drafted, st.steps[0].accepted)] += 1
        return counts, every, first
    finally:
        torch.set_num_threads(threads)


def workers() -> int:
    """Worker processes for `draw`: 2, or 1 (inline) with fewer than 2 usable cores; VERISPEC_TEST_WORKERS=N
    overrides (1 = always inline)."""
    env = os.environ.get("VERISPEC_TEST_WORKERS")
    if env:
        return max(1, int(env))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 2 if cores >= 2 else 1


def draw(job: Job, n: int, seed: int, n_tokens: int, *, sampling, prompt: list[int] = PROMPT,
         stop_ids: frozenset[int] = frozenset(), n_workers: int | None = None,
         timeout: float = 900.0) -> tuple[np.ndarray, Rounds]:
    """n generations of n_tokens tokens after `prompt`; returns (counts (V**n_tokens,), Rounds).

    `job()` builds fresh (CachedLM target, drafter, verifier, policy) and is called once per chunk (its models may
    be built outside and closed over: forked workers inherit them); the chunk's generations reuse those objects (the
    engine resets the caches and calls policy.start at every generation). The n generations are split into CHUNKS
    chunks, chunk c drawing from its own torch.Generator seeded from (seed, c), so the result depends on (job, n,
    seed, n_tokens, sampling, prompt) only: identical inline (n_workers=1) and on forked workers. A worker pool that
    does not answer within `timeout` seconds is abandoned with a warning and the chunks are run inline. Every
    generation must yield n_tokens tokens (no stop ids hit). counts[Σ t_i V^(n-1-i)] counts sequences t_1..t_n,
    V = the target CachedLM's vocab_size, the layout of exact_law.

        job = job_for(target_model, lambda: NGramDrafter(), lambda: FixedGamma(3))
        counts, rounds = draw(job, 3000, seed=1, n_tokens=4, sampling=Sampling(temperature=1.0))
        assert rounds.drafted(3) > 0 and rounds.accepted_at(3) > 0 and rounds.rejected_at(3) > 0
        assert chi2_pvalue(counts, exact_law(target_model, PROMPT, 4, Sampling(temperature=1.0))) > 1e-3
    """
    global _JOB
    _JOB = dict(job=job, n=n, seed=seed, n_tokens=n_tokens, sampling=sampling, prompt=list(prompt),
                stop_ids=frozenset(stop_ids))
    n_workers = workers() if n_workers is None else n_workers
    try:
        parts = None
        if n_workers > 1:
            # fork: the children inherit _JOB (models, closures) as it is now; only counts come back, pickled.
            # Safe with torch here: each chunk runs with one intra-op thread, so a child never enters the OpenMP
            # pool it inherited half-built (Python >= 3.12 warns about forking a threaded process regardless).
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*fork", DeprecationWarning)
                pool = multiprocessing.get_context("fork").Pool(min(n_workers, CHUNKS))
            try:
                parts = pool.map_async(_run_chunk, range(CHUNKS)).get(timeout)
                pool.close()
            except multiprocessing.TimeoutError:
                warnings.warn(f"draw: worker pool gave no answer within {timeout:.0f} s; running inline")
            finally:
                pool.terminate()
                pool.join()
        if parts is None:
            parts = [_run_chunk(c) for c in range(CHUNKS)]
    finally:
        _JOB = None
    counts = sum(p[0] for p in parts)
    L = max([n_tokens] + [max(key) + 1 for p in parts for key in p[1]])  # a drafter may overrun its cap
    rounds, first = np.zeros((L, L, L), dtype=np.int64), np.zeros((L, L), dtype=np.int64)
    for _, every, fst in parts:
        for key, c in every.items():
            rounds[key] += c
        for key, c in fst.items():
            first[key] += c
    return counts, Rounds(rounds, first)
