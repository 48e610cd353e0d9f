"""Backend "fast-int4": the group-wise int4 weight-only linear equals F.linear on its own dequantized weight (up to
bf16 activations on PyTorch's kernel, int8 activations on ours), layers it cannot take stay fp32, its fallbacks, and
a drafter on it leaves the output exact."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from verispec.backends import FastLinear, apply_backend, backend_of, weight_count
from verispec.kernels import int4 as int4_mod
from verispec.kernels.int4 import Int4Linear, int4_available, quantize_groups
from verispec.kernels.q4kernel import q4_kernel
from verispec.cache import output_width
from tests.conftest import tiny_llama
from tests.test_backend import PROMPT, greedy, linears, make_input

needs_int4 = pytest.mark.skipif(not int4_available(), reason="torch build lacks the CPU int4 weight-only kernel")
# "aten": PyTorch's int4 kernel; "q4": our VNNI kernel (kernels/q4kernel.py), where this machine builds it
KERNELS = ["aten"] + (["q4"] if q4_kernel() is not None else [])


@contextmanager
def kernel(name: str):
    """Int4Linear layers built inside take kernel `name` ("aten" = as on a machine where ours is unavailable)."""
    with mock.patch.object(int4_mod, "q4_kernel", (lambda: None) if name == "aten" else q4_kernel):
        yield


def dequantized(w: torch.Tensor, g: int) -> torch.Tensor:
    q, scale, lo = quantize_groups(w, g)  # (N, K), (N, G), (N, G)
    N, K = w.shape
    return (q.reshape(N, -1, g).float() * scale[..., None] + lo[..., None]).reshape(N, K)  # (N, K)


def test_group_quantization_error_is_at_most_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 128, generator=g)  # (N, K)
    for gs in (32, 64, 128):
        q, scale, lo = quantize_groups(w, gs)
        assert q.dtype == torch.int32 and int(q.min()) >= 0 and int(q.max()) <= 15
        err = (dequantized(w, gs) - w).abs().reshape(24, -1, gs)  # (N, G, g)
        # half a step, plus the bf16 rounding of the stored min (rel 2^-8) that the step cannot absorb
        bound = scale[..., None] / 2 + lo.abs()[..., None] * 2 ** -8 + 1e-6
        assert bool((err <= bound).all())
        assert float(err.max()) > 1e-3  # and it is visibly lossy


@needs_int4
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 80), groups=st.integers(1, 3), gs=st.sampled_from([32, 64]), rows=st.integers(1, 16),
       three_d=st.booleans(), contiguous=st.booleans(), bias=st.booleans(), seed=st.integers(0, 2**16),
       kern=st.sampled_from(KERNELS))
def test_int4_linear_equals_f_linear_on_its_dequantized_weight(n, groups, gs, rows, three_d, contiguous, bias, seed,
                                                                kern):
    k = groups * gs
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    with kernel(kern):
        layer = Int4Linear.from_linear(lin, group_size=gs, wide=False)  # the int4 kernel for every row count
    assert layer is not None and layer.kernel == (kern if gs == 32 else "aten")  # ours takes groups of 32 only
    assert layer is not None and layer.out_features == n and layer.in_features == k and layer.wide is None
    x = make_input(rows, k, three_d, contiguous, seed)
    with torch.inference_mode():
        y = layer(x)
    assert y.shape == (*x.shape[:-1], n) and y.dtype == torch.float32
    deq = dequantized(lin.weight, gs)  # (n, k)
    if layer.kernel == "q4":
        # our kernel rounds each group of 32 inputs to int8 (step max|x| / 127) in the term Σ q·d·x only (the
        # min term takes the exact sum of x): output n is off by at most half a step per input times Σ q·d
        ref = F.linear(x.float(), deq, lin.bias).detach()
        xs = x.reshape(-1, k).float()
        q, scale, _ = quantize_groups(lin.weight, 32)
        qd = (q.reshape(n, -1, 32).float() * scale[..., None]).sum(-1)  # (n, G)
        bound = (xs.reshape(-1, k // 32, 32).abs().amax(-1) / 254) @ qd.T  # (M, n)
        assert bool(((y - ref).reshape(-1, n).abs() <= bound * (1 + 1e-4) + 1e-4 * (1 + ref.abs().reshape(-1, n))).all())
        return
    # PyTorch's kernel sees the input rounded to bf16 and returns bf16: ~2^-8 relative to the output's size
    ref = F.linear(x.to(torch.bfloat16).float(), deq, lin.bias).detach()
    torch.testing.assert_close(y, ref, rtol=1e-2, atol=1e-2 * (1 + float(ref.abs().max())))


@needs_int4
@pytest.mark.parametrize("kern", KERNELS)
def test_int4_linear_edge_inputs(kern):
    lin = nn.Linear(64, 20)  # 20 outputs: padded to 32 inside, sliced back
    with kernel(kern):
        layer = Int4Linear.from_linear(lin)
    assert layer.packed.dtype == torch.uint8
    if kern == "q4":
        assert layer.packed.shape == (2, 2, 256) and layer.scales.shape == layer.mins.shape == (2, 2, 16)
    else:
        assert layer.scales_and_zeros.shape == (2, 32, 2)
    with torch.inference_mode():
        assert layer(torch.zeros(0, 64)).shape == (0, 20)
        assert layer(torch.randn(2, 3, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
        with pytest.raises(RuntimeError, match="expects 64"):
            layer(torch.randn(2, 63))
    assert weight_count(nn.Sequential(layer)) == 64 * 20 + 20  # packed weights + the bias parameter


@needs_int4
def test_wide_inputs_take_the_int8_copy():
    from verispec.kernels.int4 import WIDE_ROWS
    from verispec.kernels.int8 import int8_available, is_int8_linear

    if not int8_available():
        pytest.skip("no int8 engine: every input takes the int4 kernel")
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    layer = Int4Linear.from_linear(lin)
    assert is_int8_linear(layer.wide) and "int8 copy" in repr(layer)
    with torch.inference_mode():
        for rows in (1, WIDE_ROWS - 1, WIDE_ROWS, 3 * WIDE_ROWS):
            x = torch.randn(rows, 64)
            want = layer.wide(x) if rows >= WIDE_ROWS else layer.narrow(x)
            assert torch.equal(layer(x), want), rows
            assert float((layer(x) - lin(x)).abs().max() / lin(x).abs().max()) < 0.1  # both close to fp32
        x3 = torch.randn(2, WIDE_ROWS // 2, 64)  # WIDE_ROWS rows in a 3-D input: wide
        assert torch.equal(layer(x3), layer.wide(x3))
    assert weight_count(nn.Sequential(layer)) == 64 * 48 + 48  # the int8 copy is not counted twice


def test_layers_the_kernel_cannot_take_are_refused():
    assert Int4Linear.from_linear(nn.Linear(48, 16)) is None  # K not a multiple of the group size
    assert Int4Linear.from_linear(nn.Linear(64, 16), group_size=16) is None  # group the kernel rejects


@needs_int4
def test_model_on_fast_int4_keeps_only_int4_and_fallback_linears():
    model = tiny_llama(64, seed=3)  # hidden 32: every linear fits the kernel
    ref = greedy(model)
    m = apply_backend(copy.deepcopy(model), "fast-int4")
    mods = list(m.modules())
    assert backend_of(m) == "fast-int4" and not linears(m)
    assert all(not isinstance(x, FastLinear) for x in mods)  # nothing fell back here
    assert output_width(m) == 64 and weight_count(m) == weight_count(model)
    with torch.inference_mode():
        ids = torch.tensor([PROMPT])
        rel = float((m(ids).logits - model(ids).logits).abs().max() / model(ids).logits.abs().max())
    assert 0 < rel < 0.2  # lossy, but the same model
    assert len(greedy(model, drafter=m, n=10)) == 10 and len(ref) == 40  # drafts end to end
    with pytest.raises(ValueError, match="'fast-int4' cannot serve a target"):
        greedy(m, n=4)  # its logits depend on the row count (the int8 copy): never a target
    odd = apply_backend(tiny_llama(64, seed=3, hidden=48), "fast-int4")  # K = 48: those layers stay fp32 fast
    assert any(isinstance(x, FastLinear) for x in odd.modules())
    assert any(isinstance(x, Int4Linear) for x in odd.modules())  # the 96-wide down projection fits


@needs_int4
def test_int4_drafter_keeps_target_output(pair):
    target, _ = pair
    drafter = tiny_llama(64, seed=2, layers=1, scale=20.0)  # hidden 32, all layers int4
    ref = greedy(target.model)
    d = apply_backend(drafter, "fast-int4")
    assert backend_of(d) == "fast-int4"
    assert greedy(target.model, drafter=d) == ref
    assert greedy(apply_backend(copy.deepcopy(target.model), "fast"), drafter=d, gamma=2) == ref


def test_falls_back_to_int8_when_the_kernel_is_missing(monkeypatch, pair):
    target, _ = pair
    monkeypatch.setattr(int4_mod, "int4_available", lambda: False)
    import verispec.backends as backends

    monkeypatch.setattr(backends, "int4_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="'fast-int8' backend"):
        m = apply_backend(copy.deepcopy(target.model), "fast-int4")
    assert backend_of(m) in ("fast-int8", "fast")  # int8 itself falls back to fast where it is unavailable
    assert not any(isinstance(x, Int4Linear) for x in m.modules())
    with pytest.warns(RuntimeWarning):
        forced = apply_backend(copy.deepcopy(target.model), "fast-int4", force_fallback=True)
    assert backend_of(forced) == "fast" and greedy(forced) == greedy(target.model)


@needs_int4
@pytest.mark.parametrize("kern", KERNELS)
def test_probe_disagreement_keeps_the_layer_fp32(monkeypatch, kern):
    fn = "_int4_mm" if kern == "aten" else "q4_mm"
    real = getattr(int4_mod, fn)
    monkeypatch.setattr(int4_mod, fn, lambda *a: real(*a) * 2)  # a kernel that computes the wrong thing
    with kernel(kern):
        assert Int4Linear.from_linear(nn.Linear(64, 16)) is None
        m = apply_backend(tiny_llama(64, seed=3), "fast-int4")  # every layer disagrees: all stay fp32 "fast"
        assert not any(isinstance(x, Int4Linear) for x in m.modules())
        monkeypatch.undo()
        assert Int4Linear.from_linear(nn.Linear(64, 16)).kernel == kern


def test_drafters_loaded_by_name_get_the_cheapest_backend(tmp_path, pair, monkeypatch):
    import verispec
    import verispec.backends as backends
    from verispec.backends import drafter_backend, resolve_backend

    assert drafter_backend("auto") == drafter_backend(None) == "auto-draft"
    assert drafter_backend("fast") == "fast" and drafter_backend("torch") == "torch"  # an explicit choice is kept
    assert drafter_backend("auto", "fast-int8") == "fast-int8"
    monkeypatch.setattr(backends, "native_bf16", lambda: True)
    assert resolve_backend("auto-draft") == ("fast-int4" if int4_available() else "fast-int8")
    monkeypatch.setattr(backends, "native_bf16", lambda: False)  # PyTorch's int4 kernel wants bf16 instructions,
    monkeypatch.setattr(backends, "q4_kernel", lambda: None)  # ours AVX-512 VNNI: without either, int8 is cheaper
    assert resolve_backend("auto-draft") == "fast-int8"
    monkeypatch.setattr(backends, "q4_kernel", lambda: object())
    assert resolve_backend("auto-draft") == ("fast-int4" if int4_available() else "fast-int8")
    monkeypatch.undo()
    target, _ = pair
    tiny_llama(64, seed=2, layers=1, scale=20.0).save_pretrained(tmp_path)  # hidden 32: int4-able
    target.tokenizer.save_pretrained(tmp_path)
    out = verispec.generate(target, PROMPT, drafter=str(tmp_path), max_new_tokens=12)  # by name: auto-draft
    assert out.token_ids == greedy(target.model, n=12)
    d = verispec.load_model(str(tmp_path), backend=drafter_backend("auto"))
    assert d.backend == resolve_backend("auto-draft")
    obj = tiny_llama(64, seed=2, layers=1, scale=20.0)
    verispec.generate(target, PROMPT, drafter=obj, max_new_tokens=4)  # an object passed in is not converted
    assert linears(obj)
