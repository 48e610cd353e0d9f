"""The lean drafter forward (verispec.rewrites.lean) and fused projections (verispec.rewrites.fuse)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

import verispec
from verispec.backends import apply_backend, weight_count
from verispec.rewrites.fuse import FusedPart, fuse_projections
from verispec.kernels.int4 import int4_available
from verispec.rewrites.lean import lean_decoder
from verispec.cache import CachedLM
from verispec.drafters.draft_model import DraftModelDrafter
from verispec.models import LoadedModel

from conftest import tiny_llama, word_tokenizer


def tiny_qwen2(seed: int = 0, hidden: int = 64, **kw) -> Qwen2ForCausalLM:
    """A random Qwen2 (q/k/v with bias, grouped-query attention); widths are multiples of 32 for the int4 kernel."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, **kw)
    return Qwen2ForCausalLM(cfg).eval()


def models():
    return {"llama": lambda: tiny_llama(64, seed=3, hidden=64), "qwen2": lambda: tiny_qwen2(seed=4)}


BACKENDS = ["torch", "fast-int8"] + (["fast-int4"] if int4_available() else [])


def hf_logits(model, cache, ids):
    return model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True,
                 logits_to_keep=len(ids)).logits[0]  # (T, V)


def lean_logits(lean, model, cache, ids):
    return model.get_output_embeddings()(lean(torch.tensor([ids]), cache, len(ids)))  # (T, V)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("backend", BACKENDS)
@torch.inference_mode()
def test_lean_forward_matches_transformers(family, backend):
    """Prefill, one-token steps, a multi-token chunk on a cache, and a crop: the lean forward gives transformers'
    logits (same modules; fp32 tolerance) and leaves the same KV entries."""
    model = apply_backend(models()[family](), backend)
    lean = lean_decoder(model)
    assert lean is not None
    lean._step = False  # the Python loop (fast-int4's C++ loop uses verispec's per-row kernels: tests/test_step.py)
    hf_cache, lean_cache = DynamicCache(config=model.config), DynamicCache(config=model.config)
    for op in [[5, 9, 2, 7, 1], [3], [8], ("crop", 2), [4, 6, 11], [0], ("crop", 1), [12, 13]]:
        if op[0] == "crop":
            hf_cache.crop(-op[1])
            lean_cache.crop(-op[1])
            continue
        want, got = hf_logits(model, hf_cache, op), lean_logits(lean, model, lean_cache, op)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert lean_cache.get_seq_length() == hf_cache.get_seq_length() == 10
    for a, b in zip(hf_cache.layers, lean_cache.layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.values, b.values, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@torch.inference_mode()
def test_fused_projections_leave_the_forward_unchanged(family):
    model = models()[family]()
    fused = copy.deepcopy(model)
    assert fuse_projections(fused) == 2 * model.config.num_hidden_layers  # q/k/v and gate/up per layer
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert isinstance(attn.k_proj, FusedPart) and isinstance(mlp.up_proj, FusedPart)
    assert weight_count(fused) == weight_count(model)  # one copy of each weight, not two
    ids = torch.tensor([[5, 9, 2, 7, 1, 3]])
    torch.testing.assert_close(fused(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    # A part called on its own input (not after its siblings) computes its own slice.
    x = torch.randn(1, 3, model.config.hidden_size)
    orig = model.model.layers[0].self_attn
    torch.testing.assert_close(attn.k_proj(x), orig.k_proj(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attn.v_proj(x.clone()), orig.v_proj(x), rtol=1e-5, atol=1e-5)
    assert attn.q_proj.group._x is None  # the last part served: nothing kept alive after a forward


def test_only_lossy_backends_fuse():
    exact = apply_backend(tiny_qwen2(), "fast")
    assert not any(isinstance(m, FusedPart) for m in exact.modules())  # the exact target keeps its layers
    lossy = apply_backend(tiny_qwen2(), "fast-int8")
    assert sum(isinstance(m, FusedPart) for m in lossy.modules()) == 2 * 5
    gpt2 = apply_backend(GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2)), "fast-int8")
    assert not any(isinstance(m, FusedPart) for m in gpt2.modules())  # a family the fusion does not know


def test_unknown_models_fall_back_to_transformers_forward():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2)).eval()
    assert lean_decoder(gpt2) is None
    sliding = tiny_qwen2(use_sliding_window=True, sliding_window=4, max_window_layers=0)
    assert lean_decoder(sliding) is None  # windowed layers need a windowed mask
    lm, ref = CachedLM(gpt2, lean=True), CachedLM(gpt2)
    assert lm.lean is None
    torch.testing.assert_close(lm.forward([1, 2, 3], n_logits=2), ref.forward([1, 2, 3], n_logits=2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_lean_drafter_keeps_the_target_output(backend):
    words = ["<unk>"] + [f"w{i}" for i in range(63)]
    tok = word_tokenizer(words)
    target = LoadedModel(tiny_llama(64, seed=1, scale=20.0), tok, "tiny-target")
    drafter = LoadedModel(apply_backend(tiny_qwen2(seed=5), backend), tok, "tiny-qwen2-drafter")
    assert DraftModelDrafter(drafter.model, 64).lm.lean is not None  # drafters take the lean path
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    ar = verispec.generate(target, prompt, method="ar", max_new_tokens=24).token_ids
    sd = verispec.generate(target, prompt, drafter=drafter, method="sd", max_new_tokens=24).token_ids
    assert sd == ar


def test_the_drafter_cost_curve_times_the_lean_forward(monkeypatch):
    from verispec.bench import measure
    from verispec.rewrites.lean import LeanDecoder

    calls = []
    real = LeanDecoder.__call__
    monkeypatch.setattr(LeanDecoder, "__call__", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    model = apply_backend(tiny_qwen2(), "fast-int8")
    curve = measure.forward_cost_curve(model, ks=(1, 2), context=8, repeats=1, warmup=0, lean=True)
    assert set(curve) == {1, 2} and all(v > 0 for v in curve.values())
    assert len(calls) == 3  # the prefill, then one lean forward per k
    measure.forward_cost_curve(model, ks=(1, 2), context=8, repeats=1, warmup=0)
    assert len(calls) == 3  # the default times transformers' forward (what a target on this backend runs)


def test_fusion_can_be_switched_off():
    model = apply_backend(tiny_qwen2(), "fast-int8", fuse=False)
    assert not any(isinstance(m, FusedPart) for m in model.modules())
    assert lean_decoder(model) is not None  # the lean forward also runs separate projections
