"""The "fast" CPU backend: oneDNN packed linear == F.linear in fp32, its fallback, and greedy equality on models."""

from __future__ import annotations

import copy
import gc
import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import verispec
from verispec.backends import (FORCE_FALLBACK_ENV, FastLinear, apply_backend, backend_of, onednn_available,
                               resolve_backend, weight_count)
from verispec.kernels import onednn
from verispec.bench.measure import forward_cost_curve, format_table
from verispec.cache import output_width
from tests.conftest import tiny_llama, word_tokenizer

PROMPT = [3, 17, 42, 5, 9]
needs_onednn = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN (mkldnn)")


def close(y: torch.Tensor, ref: torch.Tensor, k: int) -> None:
    """fp32 tolerance for K-term dot products of O(1) values: sums in another order differ by ~eps * sqrt(K)."""
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=2e-6 * math.sqrt(k) * (1 + float(ref.abs().max())))


def make_input(rows: int, k: int, three_d: bool, contiguous: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if three_d:
        # rows split as (B, T): B = 1 or 2 when it divides rows
        b = 2 if rows % 2 == 0 else 1
        shape = (b, rows // b, k)
    else:
        shape = (rows, k)
    if contiguous:
        return torch.randn(*shape, generator=g)
    # a non-contiguous view: transpose of a (k, rows) buffer, or every other column of a wider buffer
    if not three_d:
        return torch.randn(k, rows, generator=g).t()  # (rows, k), strides (1, rows)
    return torch.randn(*shape[:-1], 2 * k, generator=g)[..., ::2]  # (B, T, k), last stride 2


# -- the linear itself ----------------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 96), k=st.integers(1, 96), rows=st.integers(1, 16), three_d=st.booleans(),
       contiguous=st.booleans(), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_fast_linear_equals_f_linear(n, k, rows, three_d, contiguous, bias, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)  # (N, K)
    b = torch.randn(n, generator=g) if bias else None
    x = make_input(rows, k, three_d, contiguous, seed + 1)
    lin = FastLinear(w, b)
    assert lin.is_packed == onednn_available()  # the fast path is really the one under test
    with torch.inference_mode():
        y = lin(x)
    ref = F.linear(x, w, b)
    assert y.shape == ref.shape == (*x.shape[:-1], n)
    close(y, ref, k)


@needs_onednn
@pytest.mark.parametrize("rows", range(1, 17))
@pytest.mark.parametrize("three_d", [False, True])
def test_every_row_count_on_a_wide_layer(rows, three_d):
    # widths like a real model's (not multiples of oneDNN's blocks) with bias, as in Qwen's q/k/v projections
    w, b = torch.randn(200, 136) * 0.05, torch.randn(200)
    lin = FastLinear(w, b)
    assert lin.is_packed and lin.dense is None  # the dense weight is not kept next to the packed one
    x = make_input(rows, 136, three_d, contiguous=rows % 3 != 0, seed=rows)
    with torch.inference_mode():
        close(lin(x), F.linear(x, w, b), 136)


def test_empty_input_and_other_dtypes():
    w = torch.randn(12, 8)
    lin = FastLinear(w)
    assert lin(torch.randn(0, 8)).shape == (0, 12)
    assert lin(torch.randn(2, 0, 8)).shape == (2, 0, 12)
    x = torch.randn(3, 8, dtype=torch.float64)
    y = lin(x)
    assert y.dtype == torch.float64
    close(y.float(), F.linear(x.float(), w), 8)


def test_grad_enabled_call_still_correct():
    w = torch.randn(12, 8)
    x = torch.randn(3, 8, requires_grad=True)
    y = FastLinear(w)(x)
    close(y.detach(), F.linear(x.detach(), w), 8)
    y.sum().backward()  # differentiable through the temporary dense weight
    close(x.grad, w.sum(0).expand(3, 8), 8)


# -- fallback ----------------------------------------------------------------------------------------------------------

def _check_fallback(lin: FastLinear, w, b, reason_part: str):
    assert not lin.is_packed and lin.packed is None
    assert reason_part in (lin.fallback_reason or "")
    for rows in (1, 5, 16):
        x = make_input(rows, w.shape[1], three_d=False, contiguous=False, seed=rows)
        close(lin(x), F.linear(x, w, b), w.shape[1])


def test_fallback_forced_by_argument():
    w, b = torch.randn(40, 24), torch.randn(40)
    _check_fallback(FastLinear(w, b, force_fallback=True), w, b, "forced")


def test_fallback_forced_by_environment(monkeypatch):
    monkeypatch.setenv(FORCE_FALLBACK_ENV, "1")
    w, b = torch.randn(40, 24), None
    _check_fallback(FastLinear(w, b), w, b, "forced")
    assert resolve_backend("auto") == "torch"


def test_fallback_when_onednn_unavailable(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert not onednn_available()
    w, b = torch.randn(40, 24), torch.randn(40)
    _check_fallback(FastLinear(w, b), w, b, "not available")
    assert resolve_backend("auto") == "torch"


@needs_onednn
def test_fallback_when_packing_disagrees_with_f_linear(monkeypatch):
    real = onednn.packed_linear
    monkeypatch.setattr(onednn, "packed_linear", lambda x, p, b: real(x, p, b) + 1.0)  # a wrong kernel
    w, b = torch.randn(40, 24), torch.randn(40)
    lin = FastLinear(w, b)
    monkeypatch.setattr(onednn, "packed_linear", real)
    _check_fallback(lin, w, b, "differs from F.linear")


@needs_onednn
def test_runtime_failure_switches_layer_to_torch_path(monkeypatch):
    w, b = torch.randn(40, 24), torch.randn(40)
    lin = FastLinear(w, b)
    assert lin.is_packed

    def boom(x, p, bias):
        raise RuntimeError("simulated oneDNN failure")

    monkeypatch.setattr(onednn, "packed_linear", boom)
    x = torch.randn(2, 3, 24)
    with pytest.warns(RuntimeWarning, match="simulated oneDNN failure"):
        y = lin(x)
    close(y, F.linear(x, w, b), 24)  # that call is answered by the fallback
    assert not lin.is_packed and torch.equal(lin.dense, w)  # dense weight rebuilt exactly from the packed one
    _check_fallback(lin, w, b, "simulated")


# -- whole models ------------------------------------------------------------------------------------------------------

def linears(model):
    return [m for m in model.modules() if type(m) is nn.Linear]


def greedy(model, n=40, drafter=None, gamma=4):
    return verispec.generate(model, PROMPT, drafter=drafter, gamma=gamma, max_new_tokens=n).token_ids


@pytest.mark.parametrize("force_fallback", [False, True])
def test_converted_model_gives_same_greedy_tokens(pair, force_fallback):
    target, drafter = pair
    ref_ar = greedy(target.model)
    width = output_width(target.model)
    n_weights = weight_count(target.model)
    n_linear = len(linears(target.model))
    assert n_linear > 0
    fast_t = apply_backend(copy.deepcopy(target.model), "fast", force_fallback=force_fallback)
    fast_d = apply_backend(copy.deepcopy(drafter.model), "fast", force_fallback=force_fallback)
    fast_layers = [m for m in fast_t.modules() if isinstance(m, FastLinear)]
    assert not linears(fast_t) and len(fast_layers) == n_linear  # every linear, lm_head included
    assert isinstance(fast_t.get_output_embeddings(), FastLinear)
    assert all(m.is_packed != force_fallback for m in fast_layers) or not onednn_available()
    assert output_width(fast_t) == width and fast_t.get_output_embeddings().out_features == width
    assert weight_count(fast_t) == n_weights
    assert backend_of(fast_t) == "fast" and backend_of(target.model) == "torch"

    with torch.inference_mode():
        ids = torch.tensor([PROMPT])
        close(fast_t(ids).logits, target.model(ids).logits, 32)
    assert greedy(fast_t) == ref_ar  # AR
    assert greedy(fast_t, drafter=fast_d) == ref_ar  # speculative, both models converted
    assert greedy(target.model, drafter=fast_d, gamma=3) == ref_ar  # fast drafter under a plain target
    loaded = verispec.LoadedModel(fast_t, target.tokenizer, "fast")
    assert loaded.vocab_size == width


def test_torch_backend_leaves_model_untouched(pair):
    target, _ = pair
    before = {n: id(m) for n, m in target.model.named_modules()}
    weights = {n: p.data_ptr() for n, p in target.model.named_parameters()}
    assert apply_backend(target, "torch") is target
    assert {n: id(m) for n, m in target.model.named_modules()} == before
    assert {n: p.data_ptr() for n, p in target.model.named_parameters()} == weights
    with pytest.raises(ValueError, match="unknown backend"):
        apply_backend(target, "cuda-magic")


@needs_onednn
def test_dense_weights_are_dropped(pair):
    target, _ = pair
    model = copy.deepcopy(target.model)
    n_params = sum(p.numel() for p in model.parameters())
    linear_weights = sum(m.weight.numel() for m in linears(model))
    apply_backend(model, "fast")
    # the packed copies are the only linear weights left: no dense tensor kept, none among the parameters
    assert all(m.dense is None for m in model.modules() if isinstance(m, FastLinear))
    assert sum(p.numel() for p in model.parameters()) == n_params - linear_weights
    apply_backend(model, "fast")  # idempotent
    assert backend_of(model) == "fast"


def tied_llama() -> LlamaForCausalLM:
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, eos_token_id=None,
                      bos_token_id=None, pad_token_id=None, tie_word_embeddings=True)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(20.0)  # peaked distributions, no near-ties in greedy
    assert m.lm_head.weight is m.model.embed_tokens.weight
    return m


@pytest.mark.parametrize("pack_tied", [True, False])
def test_tied_output_layer_keeps_embedding(pack_tied):
    model = tied_llama()
    ref = greedy(model)
    emb = model.get_input_embeddings().weight
    emb_before = emb.detach().clone()
    apply_backend(model, "fast", pack_tied=pack_tied)
    assert model.get_input_embeddings().weight is emb and torch.equal(emb, emb_before)  # embedding intact
    head = model.get_output_embeddings()
    assert isinstance(head, FastLinear) == pack_tied
    assert not isinstance(head, FastLinear) or head.dense is None or not onednn_available()
    assert output_width(model) == 64
    assert greedy(model) == ref


def test_copies_state_dict_and_pickle_round_trip(pair):
    target, _ = pair
    fast = apply_backend(copy.deepcopy(target.model), "fast")
    sd = fast.state_dict()
    ref_sd = target.model.state_dict()
    assert sd.keys() == ref_sd.keys() and all(torch.equal(sd[k], ref_sd[k]) for k in sd)  # dense, as nn.Linear
    other = apply_backend(tiny_llama(64, seed=9), "fast")
    other.load_state_dict(sd)
    clone = copy.deepcopy(fast)
    again = pickle.loads(pickle.dumps(fast))
    ref = greedy(target.model)
    for m in (other, clone, again):
        assert backend_of(m) == "fast"
        assert greedy(m) == ref


# -- measurement helper ------------------------------------------------------------------------------------------------

def test_forward_cost_curve_on_tiny_model():
    model = apply_backend(tiny_llama(), "fast")
    curve = forward_cost_curve(model, ks=(1, 3, 16), context=20, repeats=3, warmup=1)
    assert sorted(curve) == [1, 3, 16] and all(v > 0 and math.isfinite(v) for v in curve.values())
    table = format_table({"fast": curve})
    assert "T(16)/T(1)" in table and "| fast |" in table


def test_measure_command_on_a_local_model(tmp_path, capsys):
    from verispec.bench.measure import main

    words = ["<unk>"] + [f"w{i}" for i in range(63)]
    tiny_llama(64, seed=1, scale=20.0).save_pretrained(tmp_path)
    word_tokenizer(words).save_pretrained(tmp_path)
    out_json = tmp_path / "m.json"
    assert main(["--model", str(tmp_path), "--backend", "torch,fast", "--ks", "1,2", "--context", "8",
                 "--repeats", "2", "--warmup", "1", "--tokens", "8", "--prompt", "w1 w2 w3", "--json",
                 str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "greedy identical across backends: True" in text and "| torch |" in text and "| fast |" in text
    assert out_json.exists()
    assert main(["--model", str(tmp_path), "--backend", "fast,fast-int8", "--ks", "1,2", "--context", "8",
                 "--repeats", "2", "--warmup", "0", "--tokens", "8", "--prompt", "w1 w2 w3", "--json",
                 str(out_json)]) == 0
    import json

    res = json.loads(out_json.read_text())
    assert res["backend_of"] == {"fast": "fast", "fast-int8": "fast-int8"}  # each measured on its own backend
    capsys.readouterr()
    assert main(["--model", str(tmp_path), "--backend", "torch,fast", "--ks", "1,4", "--context", "8",
                 "--repeats", "3", "--warmup", "0", "--tokens", "8", "--prompt", "w1 w2 w3", "--interleave"]) == 0
    text = capsys.readouterr().out
    assert "greedy identical across backends: True" in text and "| fast |" in text and "T(4)/T(1)" in text


@pytest.mark.parametrize("name, force", [("fast", False), ("fast", True), ("fast-bf16", False), ("fast-int8", False),
                                         ("fast-int4", False)])
def test_file_mapped_weights_are_released(tmp_path, name, force):
    """A model loaded from safetensors maps the file; after conversion the mapping is gone (RSS not doubled)."""
    torch.manual_seed(4)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attention_bias=True, tie_word_embeddings=False,
                      eos_token_id=None, bos_token_id=None, pad_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)  # biases too: int8 packing keeps the bias tensor itself
    loaded = verispec.load_model(str(tmp_path), backend="torch")  # plain, still mapped: converted below
    ref = greedy(loaded, n=12)

    def mapped() -> bool:
        gc.collect()
        return str(tmp_path) in Path("/proc/self/maps").read_text()

    if not mapped():
        pytest.skip("this transformers/safetensors build does not memory-map weights")
    emb = loaded.model.get_input_embeddings().weight
    apply_backend(loaded, name, force_fallback=force)  # even dense fallback weights leave the mapping
    assert not mapped()
    assert loaded.model.get_input_embeddings().weight is emb  # still the same Parameter object
    if name == "fast":
        assert greedy(loaded, n=12) == ref


# -- lossy drafter backends --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("force_fallback", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_linear_is_close_to_fp32(force_fallback, bias):
    g = torch.Generator().manual_seed(7)
    w, b = torch.randn(48, 40, generator=g) * 0.1, (torch.randn(48, generator=g) if bias else None)
    lin = FastLinear(w, b, dtype=torch.bfloat16, force_fallback=force_fallback)
    from verispec.kernels.cpu import cpu_flags

    # oneDNN packs bf16 only with avx_ne_convert or AVX-512 BW/VL/DQ (an AVX2-only CPU falls back, as it says)
    flags = cpu_flags()
    packable = "avx_ne_convert" in flags or {"avx512bw", "avx512vl", "avx512dq"} <= flags
    assert lin.is_packed == (onednn_available() and packable and not force_fallback)
    for rows in (1, 7, 16):
        x = make_input(rows, 40, three_d=rows == 16, contiguous=rows != 7, seed=rows)
        with torch.inference_mode():
            y = lin(x)
        ref = F.linear(x, w, b)
        assert y.dtype == torch.float32 and y.shape == ref.shape
        err = float((y - ref).abs().max() / ref.abs().max())
        assert 0 < err < 2e-2  # bf16 rounding of weights and inputs: visibly lossy, but small


@pytest.mark.parametrize("name", ["fast-bf16", "fast-int8", "fast-int4"])
def test_lossy_drafter_backends_keep_target_output(pair, name):
    target, drafter = pair
    ref_ar = greedy(target.model)
    width = output_width(drafter.model)
    d = apply_backend(copy.deepcopy(drafter.model), name)
    assert backend_of(d) == name and not linears(d)
    assert output_width(d) == width == d.get_output_embeddings().out_features
    with torch.inference_mode():
        ids = torch.tensor([PROMPT])
        got, ref = d(ids).logits, drafter.model(ids).logits
    rel = float((got - ref).abs().max() / ref.abs().max())
    assert 0 < rel < 0.1  # reduced precision: close to, not equal to, the fp32 drafter
    # the drafter only affects speed: speculative output is still exactly the fp32 target's greedy output
    assert greedy(target.model, drafter=d) == ref_ar
    assert greedy(apply_backend(copy.deepcopy(target.model), "fast"), drafter=d, gamma=2) == ref_ar


def test_int8_falls_back_to_fast_when_forced(pair):
    target, _ = pair
    with pytest.warns(RuntimeWarning, match="using the 'fast' backend"):
        m = apply_backend(copy.deepcopy(target.model), "fast-int8", force_fallback=True)
    assert backend_of(m) == "fast"
    assert greedy(m) == greedy(target.model)


# -- the registry: lossy backends never serve a target, model objects are never converted behind the caller -----------

def test_every_backend_record_is_recognised_after_conversion(pair):
    from verispec.backends import BACKENDS, LOSSY_BACKENDS, ConvertOptions, check_target, kernel_path

    for name, rec in BACKENDS.items():
        if rec.resolve is not None:  # aliases name another record
            assert resolve_backend(name) in BACKENDS and BACKENDS[resolve_backend(name)].resolve is None
            continue
        ran = rec
        while not ran.available(ConvertOptions()):  # this machine lacks its kernel: it falls back, with a warning
            ran = BACKENDS[ran.fallback]
        m = apply_backend(copy.deepcopy(pair[0].model), name)
        assert backend_of(m) == ran.name and kernel_path(m), name
        if rec.lossy:
            assert name in LOSSY_BACKENDS and not rec.target and rec.not_target_because
            with pytest.raises(ValueError, match=f"backend '{name}' cannot serve a target.*'fast' or 'torch'"):
                check_target(name)
        else:
            check_target(name)
    with pytest.raises(ValueError, match="already on backend 'fast'; load it again"):
        apply_backend(apply_backend(copy.deepcopy(pair[0].model), "fast"), "fast-int8")  # was a silent no-op


@pytest.mark.parametrize("name", ["fast-bf16", "fast-int8", "fast-int4"])
def test_lossy_backends_are_refused_as_targets(pair, name):
    """Their logits at a position depend on the other rows of the forward (tests/test_invariance.py measures it), so
    speculative output on them would not be their own model's. Old code ran them as targets."""
    target, drafter = pair
    with pytest.raises(ValueError, match="cannot serve a target"):
        verispec.generate(target, PROMPT, drafter=drafter, backend=name, max_new_tokens=4)
    converted = apply_backend(copy.deepcopy(target.model), name)
    with pytest.raises(ValueError, match="cannot serve a target"):
        verispec.generate(converted, PROMPT, max_new_tokens=4)  # already converted objects too
    assert greedy(target.model, drafter=apply_backend(copy.deepcopy(drafter.model), name)) == greedy(target.model)


def test_model_objects_are_converted_only_as_copies(pair):
    """Old code converted a model object in place when a backend was named: generate(m, drafter=m,
    drafter_backend='fast-int8') silently turned the caller's target into an int8 model."""
    m = copy.deepcopy(pair[0].model)
    ref = greedy(m)
    out = verispec.generate(m, PROMPT, drafter=m, drafter_backend="fast-int8", max_new_tokens=40)
    assert linears(m) and backend_of(m) == "torch"  # the caller's object is untouched
    assert out.backends == ("torch", "fast-int8") and out.token_ids == ref
    fast = verispec.load_model(m, backend="fast")
    assert fast.model is not m and backend_of(fast) == "fast" and backend_of(m) == "torch"
    assert verispec.load_model(m, backend="auto").model is m  # the automatic backends leave objects alone
    same = verispec.load_model(m, backend="fast", in_place=True)
    assert same.model is m and backend_of(m) == "fast"  # converted in place only when asked
    assert verispec.load_model(m, backend="fast").model is m  # already there: nothing to do
