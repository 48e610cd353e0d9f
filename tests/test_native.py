"""The gguf backend (verispec.kernels.native, verispec.backends.native, verispec.models.gguf_native): every kernel
path computes the same bits, every row is computed as if alone, and a model built from a GGUF file is the file's
model."""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import verispec
from verispec.backends import apply_backend, backend_of, check_target, kernel_path
from verispec.backends.native import NativeLinear, to_native
from verispec.bench.invariance import batch_invariance
from verispec.cache import CachedLM
from verispec.kernels import native
from verispec.kernels.cpu import cpu_flags
from verispec.kernels.ggml_blocks import TYPES, decode, dequantize, pack, quantize
from verispec.models.gguf_native import from_gguf
from verispec.sampling import Sampling

K_QUANTS = {"q_proj": "Q4_K", "k_proj": "Q4_K", "v_proj": "Q6_K", "o_proj": "Q4_K", "gate_proj": "Q4_K",
            "up_proj": "Q4_K", "down_proj": "Q6_K", "lm_head": "Q6_K", "embed_tokens": "Q4_K"}  # as Q4_K_M files


def _layer(name: str, N: int = 37, seed: int = 0):
    t = TYPES[name]
    K = 2 * t.SB if t.SB == 256 else 96
    w = decode(name, quantize(torch.randn(N, K, generator=torch.Generator().manual_seed(seed)), name), K)
    return w, pack(w), t


def _mm(x, p, t, N, bias=None):
    return native.qmm(x, p, N, t.SB, t.GS, t.bits, t.mn_scale, bias)


def test_a_compiled_path_runs_here():
    """Where a C++ compiler exists the native kernels build; the path is named in reports."""
    import shutil

    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the torch path serves (bit-identical, slower)")
    assert native.native_path() in native.VARIANTS


@pytest.mark.parametrize("name", list(TYPES))
def test_the_path_in_use_equals_the_torch_path_bit_for_bit(name):
    w, p, t = _layer(name)
    bias = torch.randn(37)
    for M in (1, 3, 4, 5, 16):
        x = torch.randn(M, w.shape[1], generator=torch.Generator().manual_seed(M)) * 2
        assert torch.equal(_mm(x, p, t, 37, bias), native.qmm_torch(x, p, 37, t.SB, t.GS, t.bits, t.mn_scale, bias))


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K"])
def test_amx_tiles_give_the_vpdpbusd_bits(name):
    """On AMX machines Q4_K and Q6_K run on tiles from some row count on: the same bits as the vpdpbusd code and the
    torch path, for one and several 16-row passes and several superblocks (the tile pipeline's first, middle and
    last). Q6_K's scales are spread over all of -128..127 (every base-8 digit the tile code splits them into)."""
    mod = native.kernels()[1]
    if native.native_path() != "avx512_amx":
        pytest.skip(f"the {native.native_path()} path runs here, not avx512_amx")
    K, N = 6 * 256, 53
    w = decode(name, quantize(torch.randn(N, K, generator=torch.Generator().manual_seed(3)), name), K)
    p, t = pack(w), TYPES[name]
    if name == "Q6_K":
        assert p["mn"] is p["sc"]  # the tile code's condition: its offsets are its scales
        sc = torch.arange(-128, 128, dtype=torch.int8).repeat(p["sc"].numel() // 256 + 1)[: p["sc"].numel()]
        p["sc"].copy_(sc[torch.randperm(sc.numel(), generator=torch.Generator().manual_seed(1))].view_as(p["sc"]))
    bias = torch.randn(N)
    before = mod.amx_rows(-1)
    try:
        for M in (1, 2, 7, 16, 17, 40):
            x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)) * 4
            mod.amx_rows(1)
            tiles = _mm(x, p, t, N, bias)
            mod.amx_rows(10 ** 6)
            vnni = _mm(x, p, t, N, bias)
            assert torch.equal(tiles, vnni), M
            assert torch.equal(tiles, native.qmm_torch(x, p, N, t.SB, t.GS, t.bits, t.mn_scale, bias)), M
    finally:
        mod.amx_rows(before)


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(native.VARIANTS))
def test_every_variant_this_cpu_can_build_is_bit_identical(variant):
    if not set(native.VARIANTS[variant][0]) <= cpu_flags():
        pytest.skip(f"this CPU lacks {variant}")
    mod = native.build(variant)  # None if its self-test (bit equality with torch on every type) failed
    assert mod is not None and mod.path() == variant
    ref = native.build("generic")  # the per-row kernels too: the same bits on every C++ path
    g = torch.Generator().manual_seed(9)
    x, w = torch.randn(5, 896, generator=g), torch.rand(896, generator=g)
    a, u = torch.randn(3, 8960, generator=g) * 6, torch.randn(3, 8960, generator=g)
    q, k = torch.randn(1, 4, 3, 64, generator=g), torch.randn(1, 2, 40, 64, generator=g)
    allowed = torch.ones(1, 3, 40, dtype=torch.bool).tril(37)
    assert torch.equal(mod.rmsnorm(x, w, 1e-6), ref.rmsnorm(x, w, 1e-6))
    assert torch.equal(mod.silu_mul(a, u), ref.silu_mul(a, u))
    assert torch.equal(mod.attention(q, k, k, allowed, 0.125), ref.attention(q, k, k, allowed, 0.125))


@pytest.mark.parametrize("name", list(TYPES))
def test_a_row_is_the_same_alone_or_among_others(name):
    w, p, t = _layer(name, N=50)
    x = torch.randn(16, w.shape[1], generator=torch.Generator().manual_seed(3))
    full = _mm(x, p, t, 50)
    for M in (1, 2, 5, 9, 16):
        part = _mm(x[:M].contiguous(), p, t, 50)
        assert torch.equal(part, full[:M])
    for i in (0, 7, 15):
        assert torch.equal(_mm(x[i:i + 1].contiguous(), p, t, 50)[0], full[i])


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q8_0"])
def test_a_long_input_is_computed_in_chunks_with_the_same_bits(name):
    """More than 256 rows (a long prefill, a wide batch) run as chunks of 128: every row equals the torch path and
    the same row computed among 16."""
    w, p, t = _layer(name, N=40)
    x = torch.randn(300, w.shape[1], generator=torch.Generator().manual_seed(4))
    got = _mm(x, p, t, 40)
    assert torch.equal(got, native.qmm_torch(x, p, 40, t.SB, t.GS, t.bits, t.mn_scale, None))
    for a in (0, 120, 250, 284):
        assert torch.equal(got[a:a + 16], _mm(x[a:a + 16].contiguous(), p, t, 40))


@pytest.mark.parametrize("name", list(TYPES))
def test_the_product_is_the_file_weights_times_x(name):
    """The only approximation is the int8 activations: close to the dequantized product, not equal to it."""
    w, p, t = _layer(name, N=40)
    x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(4))
    ref = x.double() @ dequantize(w).double().T
    got = _mm(x, p, t, 40).double()
    assert ((got - ref).norm() / ref.norm()) < 0.02
    assert not torch.equal(got, ref)


def test_rmsnorm_silu_and_attention_are_per_row():
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(9, 64, generator=g), torch.rand(64, generator=g)
    assert torch.equal(native.rmsnorm(x, w, 1e-6)[4], native.rmsnorm(x[4:5].contiguous(), w, 1e-6)[0])
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    assert torch.allclose(native.rmsnorm(x, w, 1e-6), ref, atol=1e-5)
    a, b = torch.randn(7, 48, generator=g), torch.randn(7, 48, generator=g)
    assert torch.equal(native.silu_mul(a, b)[2:3], native.silu_mul(a[2:3].contiguous(), b[2:3].contiguous()))
    assert torch.allclose(native.silu_mul(a, b), torch.nn.functional.silu(a) * b, atol=1e-5)
    q, k, v = torch.randn(1, 4, 3, 16, generator=g), torch.randn(1, 2, 10, 16, generator=g), torch.randn(1, 2, 10, 16, generator=g)
    allowed = torch.ones(1, 3, 10, dtype=torch.bool).tril(7)
    out = native.attention(q, k, v, allowed, 0.25)  # (1, 3, 4, 16)
    # row 1 sees keys 0..8: the same as a 1-row call on 9 keys, and masked keys contribute nothing at all
    alone = native.attention(q[:, :, 1:2].contiguous(), k[:, :, :9].contiguous(), v[:, :, :9].contiguous(),
                             torch.ones(1, 1, 9, dtype=torch.bool), 0.25)
    assert torch.equal(out[:, 1], alone[:, 0])
    kk = k.repeat_interleave(2, 1)
    s = torch.einsum("bhmd,bhnd->bhmn", q, kk) * 0.25
    ref = torch.einsum("bhmn,bhnd->bmhd", torch.softmax(s.masked_fill(~allowed[:, None], -torch.inf), -1),
                       v.repeat_interleave(2, 1))
    assert torch.allclose(out, ref, atol=1e-5)


def _tiny(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    m = (Qwen2ForCausalLM(Qwen2Config(**common)) if kind == "qwen2" else LlamaForCausalLM(LlamaConfig(**common)))
    with torch.no_grad():
        m.lm_head.weight.mul_(8.0)  # peaked distributions, as a trained model's
    return m.eval()


@pytest.fixture(scope="module")
def native_qwen():
    return to_native(_tiny("qwen2"), types=K_QUANTS)


def test_every_row_of_chains_and_trees_is_bit_identical_to_ar(native_qwen):
    """k = 1..16 chains and several tree shapes (`verispec invariance`): zero deviation on every row."""
    r = batch_invariance(native_qwen, context=40)
    assert all(c["bit_identical"] for c in r["chains"].values()), {k: c["max_abs"] for k, c in r["chains"].items()}
    assert all(t["bit_identical"] for t in r["trees"].values())
    assert r["overall"]["max_abs"] == 0


def test_the_backend_is_named_and_may_serve_a_target(native_qwen):
    assert backend_of(native_qwen) == "gguf"
    check_target("gguf")
    desc = kernel_path(native_qwen)
    assert "Q4_K" in desc and "Q6_K" in desc and native.native_path() in desc


def test_greedy_speculative_output_is_ar_output_on_the_backend(native_qwen):
    drafter = copy.deepcopy(native_qwen)  # a drafter on the same backend with a perturbed output layer
    W = native_qwen.lm_head.weight + torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.1
    drafter.lm_head = NativeLinear(decode("Q8_0", quantize(W, "Q8_0"), 256))
    prompt = [10, 20, 30, 40, 50, 60]  # a prompt whose AR output varies (8 distinct tokens in 40)
    ar = verispec.generate(native_qwen, prompt, method="ar", max_new_tokens=40).token_ids
    for method in ("sd", "sd-tree"):
        out = verispec.generate(native_qwen, prompt, method=method, drafter=drafter, gamma=4, max_new_tokens=40)
        assert out.token_ids == ar
        assert 0 < out.stats.accepted < out.stats.drafted


def test_sampled_speculative_decoding_keeps_the_distribution_on_the_backend(native_qwen):
    """χ² of 2-token generations (both drafted in the first round, K = 2) against the exact law of the target on the
    gguf backend; the drafter is an fp32 model that disagrees often."""
    from scipy.stats import chisquare

    from tests.law import exact_law

    drafter = _tiny("qwen2", seed=1)
    prompt = [1, 2, 3, 4]
    with torch.no_grad():
        law = exact_law(native_qwen, prompt, 2, Sampling(temperature=1.0))  # (64 * 64,)
    n = 800
    counts = np.zeros_like(law)
    accepted = 0
    for s in range(n):
        out = verispec.generate(native_qwen, prompt, method="sd", drafter=drafter, gamma=2, max_new_tokens=2,
                                sampling=Sampling(temperature=1.0, seed=1000 + s))
        counts[out.token_ids[0] * 64 + out.token_ids[1]] += 1
        accepted += out.stats.accepted
    assert 0 < accepted < n * 2
    big = law * n >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(law[big] * n, law[~big].sum() * n)
    assert chisquare(obs, exp).pvalue > 1e-3
    wrong = np.roll(law.reshape(64, 64), 1, axis=1).reshape(-1)  # negative control: a shifted law fails
    assert chisquare(obs, np.append(wrong[big] * n, wrong[~big].sum() * n)).pvalue < 1e-6


def test_apply_backend_quantizes_an_fp32_model_to_q8_0():
    m = apply_backend(_tiny("llama"), "gguf")
    assert backend_of(m) == "gguf" and {x.type for x in m.modules() if isinstance(x, NativeLinear)} == {"Q8_0"}


def test_unsupported_models_are_refused():
    m = _tiny("llama")
    m.config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="SiLU"):
        to_native(m)
    with pytest.raises(ValueError, match="not a multiple of Q4_K's 256"):
        to_native(_tiny_narrow(), default="Q4_K")


def _tiny_narrow():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


# -- a GGUF file written here, read back by the loader --

def _llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf row permutation for q / k (the loader must undo it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path, arch: str) -> None:
    cfg = model.config
    wr = gguf.GGUFWriter(str(path), arch)
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}

    def add_q(name, w, kind):
        wr.add_tensor(name, quantize(w, kind), raw_dtype=gguf.GGMLQuantizationType[kind])

    sd = model.state_dict()
    add_q("token_embd.weight", sd["model.embed_tokens.weight"], "Q4_K")
    add_q("output.weight", sd["lm_head.weight"], "Q6_K")
    wr.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        for hf, gg in names.items():
            part = "self_attn" if hf.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            w = sd[f"{p}.{part}.{hf}.weight"]
            if arch == "llama" and hf in ("q_proj", "k_proj"):
                w = _llama_permute(w, cfg.num_attention_heads if hf == "q_proj" else cfg.num_key_value_heads)
            add_q(f"blk.{i}.{gg}.weight", w, K_QUANTS[hf])
            if f"{p}.{part}.{hf}.bias" in sd:
                wr.add_tensor(f"blk.{i}.{gg}.bias", sd[f"{p}.{part}.{hf}.bias"].numpy())
        wr.add_tensor(f"blk.{i}.attn_norm.weight", sd[f"{p}.input_layernorm.weight"].numpy())
        wr.add_tensor(f"blk.{i}.ffn_norm.weight", sd[f"{p}.post_attention_layernorm.weight"].numpy())
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_a_model_read_from_its_file_is_the_file_s_model(tmp_path, arch):
    """from_gguf (llama.cpp's names, q / k rows permuted back for llama) gives exactly the model that to_native
    builds from the same blocks, and logits close to the fp32 original."""
    fp32 = _tiny(arch, seed=3)
    with torch.no_grad():  # the norm weights are ones at init: make them informative
        for n, prm in fp32.named_parameters():
            if n.endswith("norm.weight"):
                prm.copy_(torch.rand_like(prm) + 0.5)
    write_gguf(fp32, tmp_path / "m.gguf", arch)
    fp32.config.save_pretrained(tmp_path)
    loaded = from_gguf(tmp_path / "m.gguf", tmp_path)
    built = to_native(copy.deepcopy(fp32), types=K_QUANTS)
    ids = torch.tensor([[5, 9, 2, 33, 7, 1]])
    with torch.no_grad():
        a, b, c = loaded(ids).logits, built(ids).logits, fp32(ids).logits
    assert torch.equal(a, b)
    assert torch.nn.functional.cosine_similarity(a.flatten(), c.flatten(), dim=0) > 0.9  # 4-bit random weights
    assert backend_of(loaded) == "gguf"


def test_a_file_of_another_architecture_is_refused(tmp_path):
    wr = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "gpt2")
    wr.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    _tiny("llama").config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="architecture 'gpt2'"):
        from_gguf(tmp_path / "x.gguf", tmp_path)


def test_cached_lm_trees_run_on_the_native_attention(native_qwen):
    lm = CachedLM(native_qwen)
    lm.reset()
    lm.forward([1, 2, 3, 4], 1)
    from verispec.types import Draft

    logits = lm.score([1, 2, 3, 4], Draft(tokens=[5, 6, 7], parents=[-1, -1, 0]))
    assert native_qwen.config._attn_implementation == "verispec_native" and logits.shape == (4, 64)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_the_native_decoder_is_transformers_forward_bit_for_bit(arch):
    """CachedLM runs chains on the backend's NativeDecoder (targets too): it must equal transformers' forward."""
    from transformers import DynamicCache

    from verispec.backends.native import NativeDecoder

    m = to_native(_tiny(arch, seed=4), types=K_QUANTS)
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        hf = m(ids[:, :4], past_key_values=(c1 := DynamicCache(config=m.config)), use_cache=True).logits[0]
        hf2 = m(ids[:, 4:], past_key_values=c1, use_cache=True).logits[0]
        dec = NativeDecoder(m)
        c2 = DynamicCache(config=m.config)
        lean = m.lm_head(dec(ids[:, :4], c2, 4))
        lean2 = m.lm_head(dec(ids[:, 4:], c2, 2))
    assert torch.equal(hf, lean) and torch.equal(hf2, lean2)
    assert CachedLM(m).lean is not None


def test_fused_projections_give_each_part_its_own_bits_and_keep_the_weights_once():
    """NativeDecoder runs q/k (and v where its type matches) and gate/up as one kernel call each: every output
    must be the part's own bits, the parts must keep working (transformers' forward calls them) as views of the
    fused blocks, and parts that cannot share a call are left apart."""
    from verispec.backends.native import fuse, fused_layer

    m = to_native(_tiny("qwen2", seed=5), types=K_QUANTS)
    layer = m.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    h = torch.randn(5, m.config.hidden_size)
    names = {"q_proj": attn, "k_proj": attn, "v_proj": attn, "gate_proj": mlp, "up_proj": mlp}
    before = {n: getattr(mod, n)(h) for n, mod in names.items()}
    qkv, gu = fused_layer(layer)
    assert [ns for _, ns in qkv] == [["q_proj", "k_proj"], ["v_proj"]]  # v is Q6_K in a Q4_K_M file
    assert fused_layer(layer)[1] is gu  # built once per layer
    q, k = qkv[0][0](h).split(qkv[0][0].widths, -1)
    g, u = gu(h).split(gu.widths, -1)
    got = {"q_proj": q, "k_proj": k, "v_proj": qkv[1][0](h), "gate_proj": g, "up_proj": u}
    for n, mod in names.items():
        assert torch.equal(got[n], before[n]), n
        assert torch.equal(getattr(mod, n)(h), before[n]), n  # the part itself, now a view
    assert attn.k_proj.q.untyped_storage().data_ptr() == qkv[0][0].q.untyped_storage().data_ptr()
    assert mlp.up_proj.bias is None and attn.k_proj.bias is not None
    assert fuse([attn.k_proj, attn.v_proj]) is None  # Q4_K next to Q6_K
    a, b = NativeLinear(_layer("Q4_K", N=37, seed=1)[0]), NativeLinear(_layer("Q4_K", N=48, seed=2)[0])
    assert fuse([a, b]) is None  # 37 rows: its padding would sit inside the fused output
    x = torch.randn(3, a.in_features)
    ya, yb = a(x), b(x)
    f = fuse([b, a])
    assert f.widths == [48, 37] and torch.equal(f(x), torch.cat([yb, ya], -1))


def test_solo_tree_score_takes_the_ragged_decoder_with_transformers_bits(native_qwen):
    """CachedLM.score sends a tree on this backend through NativeDecoder.ragged (no per-call overhead); its logits
    and the KV entries it leaves must be transformers' tree forward, bit for bit."""
    from transformers import DynamicCache

    from verispec.cache import tree_allowed
    from verispec.types import Draft

    tokens, draft = [3, 1, 4, 1, 5], Draft(tokens=[9, 2, 6, 5], parents=[-1, -1, 0, 2])
    lm = CachedLM(native_qwen)
    lm.reset()
    lm.prefill(tokens[:-1])
    got = lm.score(tokens, draft)  # (1 + 4, V)
    c = DynamicCache(config=native_qwen.config)
    with torch.no_grad():
        native_qwen(input_ids=torch.tensor([tokens[:-1]]), past_key_values=c, use_cache=True)
        allowed = tree_allowed(4, 1, draft.node_parents())  # (5, 9)
        mask = torch.zeros(1, 1, 5, 9).masked_fill_(~allowed, torch.finfo(torch.float32).min)
        pos = torch.tensor([[4, 5, 5, 6, 7]])
        ref = native_qwen(input_ids=torch.tensor([[5, 9, 2, 6, 5]]), position_ids=pos, attention_mask=mask,
                          past_key_values=c, use_cache=True, logits_to_keep=5).logits[0]
    assert torch.equal(got, ref)
    for a, b in zip(lm.cache.layers, c.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
