"""The C++ layer loop (verispec.backends.step): the gguf target's rows are the Python loop's bits, the KV rows are
written in place while a buffer has room, and the fast-int4 drafter's loop is its per-row kernels' computation."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from verispec.backends.native import NativeDecoder, to_native
from verispec.cache import CachedLM
from verispec.drafters.layer_skip import skip_view
from verispec.kernels import native
from verispec.kernels.q4kernel import q4_kernel
from verispec.types import Draft

from test_lean import tiny_qwen2
from test_native import K_QUANTS, _tiny

needs_kernels = pytest.mark.skipif(native.kernels()[1] is None, reason="no compiled native kernels on this machine")


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def native_model(request):
    return to_native(_tiny(request.param, seed=7), types=K_QUANTS)


def _run(lm: CachedLM, c_step: bool) -> list[torch.Tensor]:
    """Chains, a crop, a tree (index_select of the kept path) and steps after it, through CachedLM."""
    lm.lean._step = None if c_step else False
    lm.reset()
    seq = [3, 9, 1, 22, 5, 17, 40, 2]
    out = [lm.forward(seq, n_logits=3), lm.forward(seq + [7], 1), lm.forward(seq + [7, 11, 13, 4], 2)]
    out.append(lm.forward(seq + [8], 1))  # a rejection: the cache is cropped to seq
    tree = Draft(tokens=[30, 31, 32, 33], parents=[-1, -1, 0, 1])
    out.append(lm.score(seq + [8], tree))
    for t in ([30, 32], [30, 32, 6], [30, 32, 6, 1, 2, 3]):  # the kept path, then chains on the settled cache
        out.append(lm.forward(seq + [8] + t, 1))
    return out


@needs_kernels
def test_the_target_step_gives_the_python_loops_bits(native_model):
    """Every logit row and every KV entry: bit-identical to NativeDecoder's Python loop (and so to transformers'
    forward, tests/test_native.py), through chains, crops and a token tree."""
    lm = CachedLM(native_model)
    assert lm.lean.step_for(DynamicCache(config=native_model.config)) is not None
    want = _run(lm, c_step=False)
    kv_want = [(layer.keys.clone(), layer.values.clone()) for layer in lm.cache.layers]
    got = _run(lm, c_step=True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    for layer, (k, v) in zip(lm.cache.layers, kv_want):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)


def _ragged(model, c_step: bool) -> tuple[list, list]:
    """Chains of several lengths, a token tree with a side node, a prefill and a one-token step in one ragged forward
    on warm caches, then a second ragged round on the settled caches; every output and KV entry."""
    from verispec.cache import run_batch

    prompts = [[(i * 7 + j) % 60 + 1 for j in range(2 + 3 * i)] for i in range(6)]
    calls = [("forward", prompts[3], 1), ("score", prompts[1], Draft([5, 6, 7])),
             ("score", prompts[4], Draft([8, 9, 10, 11], parents=[-1, 0, -1, 2], side_tokens=[12], side_parents=[0])),
             ("prefill", prompts[5]), ("forward", prompts[2], 3)]
    lms = [CachedLM(model) for _ in calls]
    for lm, (_, ids, *_) in zip(lms, calls):
        lm.lean._step = None if c_step else False
        lm.prefill(ids[: len(ids) // 2])
    segs = [lm.plan(ids, arg if kind == "score" else None, arg if kind == "forward" else 1, prefill=kind == "prefill")
            for lm, (kind, ids, *rest) in zip(lms, calls) for arg in [rest[0] if rest else None]]
    out = run_batch(segs)
    nxt = [ids + [4, 2] for _, ids, *_ in calls]  # a rejection for the tree (crop / index_select), chains for the rest
    out += run_batch([lm.plan(ids, n_logits=2) for lm, ids in zip(lms, nxt)])
    kv = [torch.cat([ly.keys, ly.values]) for lm in lms for ly in lm.cache.layers]
    # only the C++ loop keeps the KV rows in its own buffers: proof of which path ran
    assert all(hasattr(ly, "_vs_kbuf") == c_step for lm in lms for ly in lm.cache.layers)
    return out, kv


@needs_kernels
def test_a_ragged_batch_through_the_step_gives_the_python_loops_bits(native_model):
    """Several sequences (chains, a tree, a prefill) in one C++ call: every row's logits and every KV entry equal
    NativeDecoder's Python ragged loop bit for bit."""
    got, kv_got = _ragged(native_model, c_step=True)
    want, kv_want = _ragged(native_model, c_step=False)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(got, want))
    assert all(torch.equal(a, b) for a, b in zip(kv_got, kv_want))


@needs_kernels
def test_a_long_prefill_and_a_wide_ragged_batch_give_the_python_loops_bits(native_model):
    """More than 256 rows (the step's MLP then runs in chunks, qmm in chunks): logits and KV equal the Python loop."""
    from verispec.cache import prefill_batch

    g = torch.Generator().manual_seed(2)
    long = torch.randint(0, 64, (300,), generator=g).tolist()
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (90, 140, 75)]
    out = {}
    for c_step in (True, False):
        lm = CachedLM(native_model)
        lm.lean._step = None if c_step else False
        first = lm.forward(long, n_logits=5)
        lms = [CachedLM(native_model) for _ in prompts]
        for x in lms:
            x.lean._step = None if c_step else False
        prefill_batch(lms, prompts)  # one ragged forward of 305 rows
        nxt = [x.forward(p + [1], 1) for x, p in zip(lms, prompts)]
        kv = [torch.cat([ly.keys, ly.values]) for x in [lm] + lms for ly in x.cache.layers]
        assert all(hasattr(ly, "_vs_kbuf") == c_step for ly in lm.cache.layers)
        out[c_step] = [first, *nxt, *kv]
    assert all(torch.equal(a, b) for a, b in zip(out[True], out[False]))


@needs_kernels
def test_kv_rows_are_written_in_place_while_the_buffer_has_room(native_model):
    dec = NativeDecoder(native_model)
    c = DynamicCache(config=native_model.config)
    dec(torch.tensor([[1, 2, 3, 4, 5]]), c, 1)
    buf = c.layers[0]._vs_kbuf
    assert buf.shape[2] >= 5 + 256 and c.layers[0].keys.data_ptr() == buf.data_ptr()
    for t in range(6, 12):
        dec(torch.tensor([[t]]), c, 1)
    c.crop(-3)  # a rejection: the keys stay the buffer's leading rows
    dec(torch.tensor([[40, 41]]), c, 2)
    assert c.layers[0]._vs_kbuf is buf and c.get_seq_length() == 10
    c.layers[0].keys = c.layers[0].keys.index_select(-2, torch.arange(9))  # (what a tree's settle does) a copy
    c.layers[0].values = c.layers[0].values.index_select(-2, torch.arange(9))
    for layer in c.layers[1:]:
        layer.keys, layer.values = layer.keys[..., :9, :], layer.values[..., :9, :]
    dec(torch.tensor([[42]]), c, 1)
    assert c.layers[0]._vs_kbuf is not buf and c.layers[1]._vs_kbuf.shape == buf.shape
    assert c.layers[0].keys.data_ptr() == c.layers[0]._vs_kbuf.data_ptr()


@needs_kernels
def test_an_adopted_prefix_is_a_copy_of_the_donors_rows(native_model):
    """Two caches never share a buffer: after one adopts the other's prefix, both may grow and be cropped."""
    donor, lm = CachedLM(native_model), CachedLM(native_model)
    seq = [5, 6, 7, 8, 9, 10]
    donor.forward(seq, 1)
    lm.adopt_prefix(donor, 4)
    donor.forward([5, 6, 7, 8, 1, 2, 3], 1)  # the donor rewrites rows 4.. of its buffer
    got = lm.forward(seq + [11], 2)
    solo = CachedLM(native_model)
    solo.lean._step = False
    assert torch.equal(got, solo.forward(seq + [11], 2))


@needs_kernels
def test_a_feature_tap_or_a_layer_skip_view_keeps_its_own_forward(native_model):
    lm = CachedLM(native_model)
    lm.track_features([0, "final"])  # hooks on the layers' modules: only the Python loop calls them
    try:
        assert lm.lean.step_for(lm.cache) is None
        lm.forward([1, 2, 3, 4], 1)
        assert lm.features.shape[0] == 4
    finally:
        lm.untrack_features()
    dec = NativeDecoder(native_model)
    view = skip_view(dec, [1])
    c1, c2 = DynamicCache(config=native_model.config), DynamicCache(config=native_model.config)
    assert view.step_for(c1) is not None and view.step_for(c1) is not dec.step_for(c2)
    got = view(torch.tensor([[1, 2, 3]]), c1, 3)
    view._step = False
    assert torch.equal(got, view(torch.tensor([[1, 2, 3]]), c2, 3))


def _int4_replica(lean, x_ids: torch.Tensor, cache) -> torch.Tensor:
    """The drafter step's computation in Python: native rmsnorm / heads / attention / silu_mul and the q4 layers."""
    T = x_ids.shape[1]
    P = cache.get_seq_length()
    x = lean.embed(x_ids)[0]  # (T, H)
    cos, sin = lean.rotary(x[None], torch.arange(P, P + T).unsqueeze(0))  # (1, T, hd)
    allowed = torch.ones(T, P + T, dtype=torch.bool).tril(P).unsqueeze(0)  # (1, T, P + T)
    for i, (ln1, ln2, attn, mlp, qkv, gate_up) in enumerate(lean.blocks):
        q, k, v = qkv(native.rmsnorm(x, ln1.weight, ln1.variance_epsilon))
        nkv = k.shape[-1] // attn.head_dim
        q, k, v = native.heads(q, q.shape[-1] // attn.head_dim, cos, sin), native.heads(k, nkv, cos, sin), \
            native.heads(v, nkv)
        k, v = cache.update(k, v, i)
        o = native.attention(q, k, v, allowed, attn.scaling)  # (1, T, nh, hd)
        x = x + attn.o_proj(o.reshape(T, -1).contiguous())
        g, u = gate_up(native.rmsnorm(x, ln2.weight, ln2.variance_epsilon))
        x = x + mlp.down_proj(native.silu_mul(g.contiguous(), u.contiguous()))
    return lean.norm(x)


@pytest.mark.skipif(native.kernels()[1] is None or q4_kernel() is None, reason="needs the AVX-512 VNNI kernels")
@torch.inference_mode()
def test_the_int4_drafter_step_is_its_kernels_computation():
    """A fast-int4 drafter's C++ loop: bit-identical to the same per-row kernels called from Python, and close to
    transformers' forward (not equal: other roundings, amplified where a value's int8 rounding flips)."""
    from verispec.backends import apply_backend

    model = apply_backend(tiny_qwen2(seed=5, hidden=128), "fast-int4")
    lm = CachedLM(model, lean=True)
    lean = lm.lean
    c1, c2, c3 = (DynamicCache(config=model.config) for _ in range(3))
    assert lean.step_for(c1, 1) is not None
    for chunk in ([4, 8, 15, 16, 23], [42], [7], [1, 2, 3]):
        ids = torch.tensor([chunk])
        got = lean(ids, c1, len(chunk))
        assert torch.equal(got, _int4_replica(lean, ids, c2))
        want = model(input_ids=ids, past_key_values=c3, use_cache=True, logits_to_keep=len(chunk)).logits[0]
        logits = model.lm_head(got)
        torch.testing.assert_close(logits, want, rtol=0, atol=0.05 * float(want.abs().max()))
    assert lean.step_for(c1, 16) is None  # wide inputs take the int8 copies, on the Python loop


def test_the_cost_curve_times_the_targets_engine_forward(native_model, monkeypatch):
    """The bench's T(k) of a gguf target is its NativeDecoder (the C++ loop), not transformers' forward."""
    from verispec.bench import measure

    calls = []
    real = NativeDecoder.__call__
    monkeypatch.setattr(NativeDecoder, "__call__", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    curve = measure.forward_cost_curve(native_model, ks=(1, 2), context=8, repeats=1, warmup=0)
    assert set(curve) == {1, 2} and len(calls) == 3  # the prefill, then one forward per k
