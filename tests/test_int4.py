"""Backend "fast-int4": the group-wise int4 weight-only linear equals F.linear on its own dequantized weight (up to
bf16 activations), layers it cannot take stay fp32, its fallbacks, and a drafter on it leaves the output exact."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from verispec.backends import FastLinear, apply_backend, backend_of, weight_count
from verispec.backends import int4 as int4_mod
from verispec.backends.int4 import Int4Linear, int4_available, quantize_groups
from verispec.cache import output_width
from tests.conftest import tiny_llama
from tests.test_backend import PROMPT, greedy, linears, make_input

needs_int4 = pytest.mark.skipif(not int4_available(), reason="torch build lacks the CPU int4 weight-only kernel")


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
       three_d=st.booleans(), contiguous=st.booleans(), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_int4_linear_equals_f_linear_on_its_dequantized_weight(n, groups, gs, rows, three_d, contiguous, bias, seed):
    k = groups * gs
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    layer = Int4Linear.from_linear(lin, group_size=gs)
    assert layer is not None and layer.out_features == n and layer.in_features == k
    x = make_input(rows, k, three_d, contiguous, seed)
    with torch.inference_mode():
        y = layer(x)
    ref = F.linear(x.to(torch.bfloat16).float(), dequantized(lin.weight, gs), lin.bias).detach()  # kernel sees bf16 input
    assert y.shape == ref.shape and y.dtype == torch.float32
    # the kernel returns bf16: ~2^-8 relative to the output's size
    torch.testing.assert_close(y, ref, rtol=1e-2, atol=1e-2 * (1 + float(ref.abs().max())))


@needs_int4
def test_int4_linear_edge_inputs():
    lin = nn.Linear(64, 20)  # 20 outputs: padded to 32 inside, sliced back
    layer = Int4Linear.from_linear(lin)
    assert layer.packed.dtype == torch.uint8 and layer.scales_and_zeros.shape == (2, 32, 2)
    with torch.inference_mode():
        assert layer(torch.zeros(0, 64)).shape == (0, 20)
        assert layer(torch.randn(2, 3, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
        with pytest.raises(RuntimeError, match="expects 64"):
            layer(torch.randn(2, 63))
    assert weight_count(nn.Sequential(layer)) == 64 * 20 + 20  # packed weights + the bias parameter


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
    assert len(greedy(m, n=10)) == 10 and len(ref) == 40  # runs end to end (its tokens may differ: it is int4)
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
def test_probe_disagreement_keeps_the_layer_fp32(monkeypatch):
    real = int4_mod._int4_mm
    monkeypatch.setattr(int4_mod, "_int4_mm", lambda *a: real(*a) * 2)  # a kernel that computes the wrong thing
    assert Int4Linear.from_linear(nn.Linear(64, 16)) is None
    m = apply_backend(tiny_llama(64, seed=3), "fast-int4")  # every layer disagrees: all stay fp32 "fast"
    assert not any(isinstance(x, Int4Linear) for x in m.modules())
    monkeypatch.undo()
    assert Int4Linear.from_linear(nn.Linear(64, 16)) is not None
