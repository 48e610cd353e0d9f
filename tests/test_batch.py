"""The batched engine: per-sequence output equals the solo run, sampled output keeps the target's law, streams join
and leave between rounds, and one stream's failure or cancellation touches no other."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import verispec
from tests.test_native import K_QUANTS, _tiny
from verispec.backends.native import NativeLinear, to_native
from verispec.batch import BatchEngine, Request
from verispec.cache import CachedLM, run_batch
from verispec.kernels.ggml_blocks import decode, quantize
from verispec.sampling import Sampling
from verispec.types import Draft


@pytest.fixture(scope="module")
def native_pair():
    t = to_native(_tiny("qwen2"), types=K_QUANTS)
    d = copy.deepcopy(t)  # a drafter on the same backend with a perturbed output layer: some drafts rejected
    W = t.lm_head.weight + torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.1
    d.lm_head = NativeLinear(decode("Q8_0", quantize(W, "Q8_0"), 256))
    return t, d


PROMPTS = [[(i * 7 + j) % 60 + 1 for j in range(2 + 3 * i)] for i in range(8)]  # 2 .. 23 tokens


def _kv(lm: CachedLM) -> list[torch.Tensor]:
    return [torch.cat([layer.keys, layer.values]) for layer in lm.cache.layers]


def test_one_ragged_forward_gives_every_sequence_its_solo_bits(native_pair):
    """Chains of several lengths, a token tree (with a side node), a prefill and a one-token step share one forward;
    each segment's logits and KV entries equal its own solo call bit for bit."""
    t, _ = native_pair
    calls = [("forward", PROMPTS[3], 1), ("score", PROMPTS[1], Draft([5, 6, 7])),
             ("score", PROMPTS[4], Draft([8, 9, 10, 11], parents=[-1, 0, -1, 2], side_tokens=[12], side_parents=[0])),
             ("prefill", PROMPTS[6]), ("forward", PROMPTS[2], 3)]
    solo, batch = [], []
    for kind, *args in calls:
        a, b = CachedLM(t), CachedLM(t)
        for lm in (a, b):  # a warm cache: part of each prompt fed before, as in a running stream
            lm.prefill(args[0][: len(args[0]) // 2])
        solo.append((a, getattr(a, kind)(*args)))
        batch.append(b)
    segs = [lm.plan(args[0], args[1] if kind == "score" else None, args[1] if kind == "forward" else 1,
                    prefill=kind == "prefill") for lm, (kind, *args) in zip(batch, calls)]
    out = run_batch(segs)
    for (a, la), b, lb in zip(solo, batch, out):
        assert (la is None) == (lb is None)
        if la is not None:
            assert torch.equal(la, lb)
        assert a.ids == b.ids and a.tree == b.tree and a.forwards == b.forwards
        assert all(torch.equal(x, y) for x, y in zip(_kv(a), _kv(b)))


@pytest.mark.parametrize("method", ["ar", "sd", "pld", "sd-tree"])
def test_every_sequence_equals_its_solo_run_greedy(native_pair, method):
    """B = 8 streams of different prompt lengths, budgets and stop tokens (so they end at different rounds)."""
    t, d = native_pair
    drafter = d if method.startswith("sd") else None
    solo = [verispec.generate(t, p, method=method, drafter=drafter, max_new_tokens=6 + 3 * i).token_ids
            for i, p in enumerate(PROMPTS)]
    # A stop token per stream taken from its own solo output, so some streams stop early, mid-round.
    stops = [frozenset({s[len(s) // 2]}) if i % 2 else frozenset() for i, s in enumerate(solo)]
    expect = [s[: s.index(next(iter(st))) + 1] if st else s for s, st in zip(solo, stops)]
    eng = BatchEngine(t, drafter, method=method, max_batch=8)
    streams = eng.run([Request(p, 6 + 3 * i, stop_ids=stops[i]) for i, p in enumerate(PROMPTS)])
    assert [s.output_ids for s in streams] == expect
    assert [s.finish_reason for s in streams] == ["stop" if st else "length" for st in stops]
    assert eng.rounds < sum(len(e) for e in expect)  # sequences really shared rounds
    assert eng.idle and all(s.lm.cache is None for s in streams)  # caches freed as streams end
    if method != "ar":
        assert 0 < sum(s.stats.accepted for s in streams) < sum(s.stats.drafted for s in streams)


def test_streams_join_and_leave_between_rounds(native_pair):
    """More requests than slots: a finished stream's slot goes to the next waiting one; outputs unchanged."""
    t, d = native_pair
    solo = [verispec.generate(t, p, method="sd", drafter=d, max_new_tokens=4 + 5 * (i % 3)).token_ids
            for i, p in enumerate(PROMPTS)]
    eng = BatchEngine(t, d, method="sd", max_batch=3)
    streams = [eng.submit(Request(p, 4 + 5 * (i % 3))) for i, p in enumerate(PROMPTS)]
    most = 0
    for _ in range(200):
        eng.step()
        most = max(most, len(eng.running))
        assert len(eng.running) <= 3
        if eng.idle:
            break
    assert eng.idle and most == 3
    assert [s.output_ids for s in streams] == solo


def test_per_request_methods_share_the_round(native_pair):
    t, d = native_pair
    methods = ["ar", "sd", "pld", "sd", "ar", "sd-tree"]
    solo = [verispec.generate(t, PROMPTS[i], method=m, drafter=d if m.startswith("sd") else None,
                              max_new_tokens=12).token_ids for i, m in enumerate(methods)]
    eng = BatchEngine(t, d, method="sd")
    streams = eng.run([Request(PROMPTS[i], 12, method=m) for i, m in enumerate(methods)])
    assert [s.output_ids for s in streams] == solo
    assert [s.method for s in streams] == methods


def test_the_batched_drafter_proposes_what_the_solo_one_would(native_pair):
    """sd's shared draft forwards on the gguf backend: the same draft tokens and q as solo proposals."""
    from verispec.drafters.draft_model import DraftModelDrafter
    from verispec.policies.fixed import FixedGamma

    _, d = native_pair
    g = Sampling(temperature=0.8)
    solo, many = [], []
    for p in PROMPTS[:4]:
        a, b = DraftModelDrafter(d, 64), DraftModelDrafter(d, 64)
        a.prefill(p)
        solo.append(a.propose(p, 4, FixedGamma(4), g, torch.Generator().manual_seed(len(p))))
        many.append(b)
    DraftModelDrafter.prefill_batch(many, PROMPTS[:4])
    got = DraftModelDrafter.propose_batch(many, PROMPTS[:4], [4, 4, 4, 4], [FixedGamma(4)] * 4, [g] * 4,
                                          [torch.Generator().manual_seed(len(p)) for p in PROMPTS[:4]])
    for x, y in zip(solo, got):
        assert x.tokens == y.tokens and torch.equal(x.q, y.q)


def test_other_backends_run_sequences_one_by_one_with_solo_results(pair):
    """The torch backend's rounding depends on the row count, so its sequences are not stacked: still the solo
    output."""
    target, drafter = pair
    solo = [verispec.generate(target, p, method="sd", drafter=drafter, max_new_tokens=10).token_ids
            for p in PROMPTS[:4]]
    eng = BatchEngine(target, drafter, method="sd", max_batch=4)
    assert [s.output_ids for s in eng.run([Request(p, 10) for p in PROMPTS[:4]])] == solo


def test_sampled_batched_decoding_keeps_the_targets_law(native_pair):
    """χ² of 2-token generations (both drafted in one round, K = 2) from 8 streams at a time against the exact law
    of the target; each stream draws from its own seed. Negative control: a shifted law fails."""
    from scipy.stats import chisquare

    from tests.law import exact_law

    t, _ = native_pair
    drafter = _tiny("qwen2", seed=1)  # an fp32 drafter that disagrees often
    prompt = [1, 2, 3, 4]
    sampling = lambda s: Sampling(temperature=1.0, seed=5000 + s)
    with torch.no_grad():
        law = exact_law(t, prompt, 2, Sampling(temperature=1.0))  # (64 * 64,)
    n = 800
    eng = BatchEngine(t, drafter, method="sd", gamma=2, max_batch=8)
    streams = eng.run([Request(prompt, 2, sampling(s)) for s in range(n)])
    counts = np.zeros_like(law)
    for s in streams:
        counts[s.output_ids[0] * 64 + s.output_ids[1]] += 1
    accepted = sum(s.stats.accepted for s in streams)
    assert 0 < accepted < 2 * n
    assert eng.rounds < n  # several streams per target forward
    big = law * n >= 5
    obs = np.append(counts[big], counts[~big].sum())
    assert chisquare(obs, np.append(law[big] * n, law[~big].sum() * n)).pvalue > 1e-3
    wrong = np.roll(law.reshape(64, 64), 1, axis=1).reshape(-1)
    assert chisquare(obs, np.append(wrong[big] * n, wrong[~big].sum() * n)).pvalue < 1e-6


def test_bad_requests_raise_at_submit_and_queue_nothing(native_pair):
    t, d = native_pair
    eng = BatchEngine(t, d, method="sd")
    for bad in (Request([], 4), Request([1, 2], 0), Request([1, 2], 600), Request([1, 99], 4),
                Request([1, 2], 4, method="nope"), Request([1, 2], 4, method="beam"),
                Request([1, 2], 4, options={"bogus": 1})):
        with pytest.raises(ValueError):
            eng.submit(bad)
    assert eng.idle
    with pytest.raises(ValueError, match="needs a drafter"):
        BatchEngine(t, method="sd")


def test_a_cancelled_or_failing_stream_ends_alone(native_pair):
    t, d = native_pair
    eng = BatchEngine(t, d, method="sd", max_batch=4)
    streams = [eng.submit(Request(p, 20)) for p in PROMPTS[:4]]
    eng.step()
    eng.cancel(streams[0])

    def boom(*a):
        raise RuntimeError("drafter broke")

    streams[1].drafter.commit = boom  # this stream's drafter fails in its next round
    streams[2].request.on_tokens = lambda s, new: False  # a client that went away
    for _ in range(100):
        if eng.idle:
            break
        eng.step()
    assert [s.finish_reason for s in streams] == ["cancelled", "error", "stop", "length"]
    assert "drafter broke" in streams[1].error
    solo = verispec.generate(t, PROMPTS[3], method="sd", drafter=d, max_new_tokens=20).token_ids
    assert streams[3].output_ids == solo
    assert all(s.lm.cache is None for s in streams)


def test_shared_prompt_prefixes_are_copied_not_recomputed(native_pair):
    """Prefix caching: joiners sharing a long prompt prefix (with each other, or with a running stream) copy its KV
    entries; outputs equal solo runs, and the target is fed fewer prompt tokens."""
    t, d = native_pair
    stem = [(5 * j) % 60 + 1 for j in range(40)]
    prompts = [stem + [7, 8 + i] for i in range(4)]
    solo = [verispec.generate(t, p, method="sd", drafter=d, max_new_tokens=10).token_ids for p in prompts]
    eng = BatchEngine(t, d, method="sd")
    streams = [eng.submit(Request(p, 10)) for p in prompts[:3]]
    eng.step()
    late = eng.submit(Request(prompts[3], 10))  # joins while the first three run: copies from one of them
    for _ in range(50):
        if eng.idle:
            break
        eng.step()
    streams.append(late)
    assert [s.output_ids for s in streams] == solo
    fed = sum(s.stats.target_tokens_processed for s in streams)
    alone = BatchEngine(t, d, method="sd", max_batch=1)
    unshared = sum(s.stats.target_tokens_processed for s in alone.run([Request(p, 10) for p in prompts]))
    assert fed <= unshared - 3 * (len(stem) - 1)  # three of the four prompts did not feed the shared stem
