"""The "gguf" backend: a Qwen2 / Llama model run on its GGUF file's own blocks, batch-invariant by construction.

Every operation of the forward whose result could depend on the other rows of a forward is replaced by a per-row
kernel of `verispec.kernels.native`:
- the linear layers (attention projections, MLP, output layer) by `NativeLinear` (integer dot products with the
  file's blocks; a row's result does not depend on the row count);
- the RMSNorms by `NativeRMSNorm`, SiLU·up by `NativeMLP`;
- attention by the function registered as "verispec_native" (per query row, over the keys it may see, in key order:
  a chain row, a tree node and an AR step with the same prefix give the same bits);
- the rotary cos / sin by a table per position (`RotaryTable`): computed in fixed chunks once, then looked up;
- the embedding by `NativeEmbedding` (rows dequantized on lookup by ggml's formula: the file's values).
What is left is elementwise (residual adds, the rotary products, bias adds), exact per element whatever the shape.
So on this backend greedy speculative output equals greedy AR token for token, and sampled speculative output has
AR's distribution exactly (tests: every row bit-identical for chains k = 1..16 and token trees).

`from_gguf` builds the model from a file (`verispec.models.gguf_native`); `to_native` converts an in-process fp32
model by quantizing its linear layers (default Q8_0): such a model *is* the quantized one from then on.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from torch import nn

from verispec.kernels import native
from verispec.kernels.ggml_blocks import TYPES, IntWeights, decode, pack, quantize
from verispec.rewrites.lean import LeanDecoder

ATTN_IMPL = "verispec_native"


class NativeLinear(nn.Module):
    """y = x Wᵀ + b with W the file's blocks (`verispec.kernels.native.qmm`)."""

    def __init__(self, w: IntWeights, bias: torch.Tensor | None = None):
        super().__init__()
        t = w.type
        self.type = t.name
        self.out_features, self.in_features = w.shape
        self._fmt = (t.SB, t.GS, t.bits, t.mn_scale)
        for k, v in pack(w).items():
            self.register_buffer(k, v, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous().clone(),
                             persistent=False)

    @property
    def packed(self) -> dict:
        return {"q": self.q, "sc": self.sc, "mn": self.mn, "D": self.D, "Dm": self.Dm,
                **({"_codes": self._codes} if hasattr(self, "_codes") else {})}

    @property
    def weight(self) -> torch.Tensor:
        """The file's weights as fp32 (N, K), computed on request (for code that reads .weight; not the forward)."""
        SB, GS, bits, mn_scale = self._fmt
        K, N = self.in_features, self.out_features
        q = native.unpack_codes(self.packed, K, GS, bits)[:N].float().view(N, K // GS, GS)
        lanes = lambda a: a.permute(0, 2, 1).reshape(-1, a.shape[1])[:N].float()  # (N, groups)
        t = TYPES[self.type]
        scale = (lanes(self.D).repeat_interleave(SB // GS, 1) * lanes(self.sc)).unsqueeze(-1)
        if t.zero is not None:
            return (scale * (q - float(t.zero))).reshape(N, K)
        return (scale * q - (lanes(self.Dm).repeat_interleave(SB // GS, 1) * lanes(self.mn)).unsqueeze(-1)).reshape(N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        mod = native.kernels()[1]
        if mod is not None:  # the C++ path straight away: this call runs ~200 times per forward
            b = self._buffers
            y = mod.qmm(x.reshape(-1, self.in_features).float().contiguous(), b["q"], b["sc"], b["mn"], b["D"],
                        b["Dm"], self.out_features, *self._fmt, b["bias"])  # (M, N)
            return y.view(*shape[:-1], self.out_features)
        p = self.packed
        y = native.qmm(x.reshape(-1, self.in_features), p, self.out_features, *self._fmt, self.bias)  # (M, N)
        if "_codes" in p and not hasattr(self, "_codes"):
            self._codes = p["_codes"]  # the torch path's unpacked codes, kept for the next call
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.type}, bias={self.bias is not None}"


class NativeEmbedding(nn.Module):
    """Token rows dequantized on lookup (ggml's formulas: exactly the file's values)."""

    def __init__(self, w: IntWeights):
        super().__init__()
        t = w.type
        self.type, self.t = t.name, t
        self.num_embeddings, self.embedding_dim = w.shape
        q = torch.from_numpy(np.ascontiguousarray(w.q))
        self.nibbles = t.bits == 4
        if self.nibbles:  # two codes per byte: the table stays the file's size
            q = q[:, 0::2] | (q[:, 1::2] << 4)
        self.register_buffer("q", q.contiguous(), persistent=False)
        for k in ("sc", "mn", "D", "Dm"):
            self.register_buffer(k, torch.from_numpy(np.ascontiguousarray(getattr(w, k))), persistent=False)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        t = self.t
        q = self.q[idx]
        if self.nibbles:
            q = torch.stack([q & 15, q >> 4], -1).reshape(len(idx), -1)
        n, K = len(idx), self.embedding_dim
        rep = t.SB // t.GS
        scale = (self.D[idx].float().repeat_interleave(rep, 1) * self.sc[idx].float()).unsqueeze(-1)  # (n, G, 1)
        qf = q.float().view(n, K // t.GS, t.GS)
        if t.zero is not None:
            out = scale * (qf - float(t.zero))
        else:
            out = scale * qf - (self.Dm[idx].float().repeat_interleave(rep, 1) * self.mn[idx].float()).unsqueeze(-1)
        return out.reshape(n, K)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids.reshape(-1)).view(*ids.shape, self.embedding_dim)

    @property
    def weight(self) -> torch.Tensor:  # the whole table, for code that asks (slow; not used by the forward)
        return self.rows(torch.arange(self.num_embeddings))


class NativeRMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().contiguous().clone(), requires_grad=False)
        self.variance_epsilon = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H = x.shape[-1]
        return native.rmsnorm(x.reshape(-1, H), self.weight, self.variance_epsilon).view(x.shape)


class NativeMLP(nn.Module):
    """down(SiLU(gate(x)) · up(x)), the SiLU·up per element by one exp (`verispec.kernels.native.silu_mul`)."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(native.silu_mul(self.gate_proj(x), self.up_proj(x)))


def fuse(parts: list[NativeLinear]) -> NativeLinear | None:
    """One NativeLinear computing `parts` side by side (their outputs concatenated, in order), for one kernel call
    and one activation quantization where there were several; or None where they differ in block type, input width
    or bias, or an inner part's width is not a multiple of 16 (its padding rows would land inside the output).
    Each output row block is computed on its own, so every value is the same bits as the part's own call. The parts'
    buffers become views of the fused ones: the weights stay in memory once."""
    first = parts[0]
    if (len(parts) < 2 or any(p.type != first.type or p.in_features != first.in_features for p in parts)
            or any(p.out_features % 16 for p in parts[:-1]) or len({p.bias is None for p in parts}) > 1):
        return None
    f = NativeLinear.__new__(NativeLinear)
    nn.Module.__init__(f)
    f.type, f._fmt, f.in_features = first.type, first._fmt, first.in_features
    f.out_features = sum(p.out_features for p in parts)
    for k in ("q", "sc", "D"):
        f.register_buffer(k, torch.cat([getattr(p, k) for p in parts]), persistent=False)
    for k, base in (("mn", "sc"), ("Dm", "D")):  # Q6_K's offsets are its scales: keep them one tensor
        shared = all(getattr(p, k) is getattr(p, base) for p in parts)
        f.register_buffer(k, getattr(f, base) if shared else torch.cat([getattr(p, k) for p in parts]),
                          persistent=False)
    f.register_buffer("bias", None if first.bias is None else torch.cat([p.bias for p in parts]), persistent=False)
    at = 0
    for p in parts:
        nb = p.q.shape[0]
        for k in ("q", "sc", "mn", "D", "Dm"):
            setattr(p, k, getattr(f, k)[at:at + nb])
        if p.bias is not None:
            p.bias = f.bias[16 * at:16 * at + p.out_features]
        at += nb
    f.widths = [p.out_features for p in parts]
    return f


def fused_layer(layer: nn.Module) -> tuple[list[tuple[NativeLinear, list[str]]], NativeLinear | None]:
    """A decoder layer's projections grouped for `NativeDecoder`, built once per layer and kept on it: runs of
    q/k/v of one block type as one call each ([(linear, names)]), and gate+up as one call (or None)."""
    got = getattr(layer, "_vs_fused", None)
    if got is None:
        attn = layer.self_attn
        runs: list[list[str]] = []
        for n in ("q_proj", "k_proj", "v_proj"):
            if runs and getattr(attn, runs[-1][0]).type == getattr(attn, n).type:
                runs[-1].append(n)
            else:
                runs.append([n])
        qkv = []
        for names in runs:
            lin = fuse([getattr(attn, n) for n in names]) if len(names) > 1 else None
            qkv += [(lin, names)] if lin is not None else [(getattr(attn, n), [n]) for n in names]
        got = (qkv, fuse([layer.mlp.gate_proj, layer.mlp.up_proj]))
        object.__setattr__(layer, "_vs_fused", got)  # not a submodule: state_dict and .modules() stay as they were
    return got


class RotaryTable(nn.Module):
    """cos / sin per position, computed by the model's own rotary module in fixed chunks of CHUNK positions and
    then looked up: a position's values never depend on which other positions share the forward."""

    CHUNK = 256

    def __init__(self, rotary: nn.Module):
        super().__init__()
        self.rotary = rotary
        self.cos = self.sin = None

    def _grow(self, n: int, like: torch.Tensor) -> None:
        have = 0 if self.cos is None else self.cos.shape[0]
        if n <= have:
            return
        parts_c, parts_s = ([self.cos], [self.sin]) if self.cos is not None else ([], [])
        for p0 in range(have, n, self.CHUNK):
            pos = torch.arange(p0, p0 + self.CHUNK).unsqueeze(0)  # (1, CHUNK)
            c, s = self.rotary(like[:1, :1].float(), pos)  # (1, CHUNK, D)
            parts_c.append(c[0])
            parts_s.append(s[0])
        self.cos, self.sin = torch.cat(parts_c), torch.cat(parts_s)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        self._grow(int(position_ids.max()) + 1, x)
        return self.cos[position_ids].to(x.dtype), self.sin[position_ids].to(x.dtype)  # (B, M, D) each


def native_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface: query (B, Hq, M, D), key / value (B, Hkv, N, D) -> ((B, M, Hq, D), None).
    The mask is a bool (True = may attend) or additive float 4D mask (B or 1, 1, M, N), or None for causal."""
    B, _, M, Dh = query.shape
    N = key.shape[2]
    if attention_mask is None:
        allowed = torch.ones(M, N, dtype=torch.bool).tril(N - M).expand(B, M, N)
    else:
        m = attention_mask[:, 0, :, -N:] if attention_mask.dim() == 4 else attention_mask
        allowed = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
        allowed = allowed.expand(B, M, N)
    scale = scaling if scaling is not None else Dh ** -0.5
    return native.attention(query, key, value, allowed.contiguous(), scale), None


def _bool_causal_mask(*args, **kwargs):
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False  # always a mask: the kernel reads it per row
    return sdpa_mask(*args, **kwargs)


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPL, native_attention)
    AttentionMaskInterface.register(ATTN_IMPL, _bool_causal_mask)


SUPPORTED = ("Qwen2ForCausalLM", "LlamaForCausalLM")


def check_supported(model: nn.Module) -> None:
    cfg = model.config
    name = type(model).__name__
    if name not in SUPPORTED:
        raise ValueError(f"the gguf backend runs {', '.join(SUPPORTED)}; got {name}")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"the gguf backend needs a SiLU MLP; {name} uses {cfg.hidden_act}")
    if getattr(cfg, "use_sliding_window", False):
        raise ValueError("the gguf backend has no sliding-window attention; this model uses it")
    rope = getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ValueError(f"the gguf backend supports default rotary embeddings only; got {rope}")


def native_linear(spec) -> NativeLinear:
    return spec if isinstance(spec, NativeLinear) else NativeLinear(*spec)


def install(model: nn.Module, linears: dict[str, NativeLinear | tuple[IntWeights, torch.Tensor | None]],
            embedding: IntWeights, norms: dict[str, torch.Tensor]) -> nn.Module:
    """Put the native modules into `model` (built on any device, e.g. "meta"): `linears` (NativeLinear, or
    (IntWeights, bias)) by HF module name ("model.layers.0.self_attn.q_proj", "lm_head", ...), `norms` by HF
    parameter name of their weight."""
    check_supported(model)
    cfg = model.config
    eps = float(cfg.rms_norm_eps)
    body = model.model
    for i, layer in enumerate(body.layers):
        pre = f"model.layers.{i}"
        attn = layer.self_attn
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(attn, n, native_linear(linears[f"{pre}.self_attn.{n}"]))
        layer.mlp = NativeMLP(*(native_linear(linears[f"{pre}.mlp.{n}"]) for n in ("gate_proj", "up_proj", "down_proj")))
        layer.input_layernorm = NativeRMSNorm(norms[f"{pre}.input_layernorm.weight"], eps)
        layer.post_attention_layernorm = NativeRMSNorm(norms[f"{pre}.post_attention_layernorm.weight"], eps)
    body.norm = NativeRMSNorm(norms["model.norm.weight"], eps)
    body.embed_tokens = NativeEmbedding(embedding)
    model.lm_head = native_linear(linears["lm_head"])
    rotary = body.rotary_emb
    if any(b.device.type == "meta" for b in rotary.buffers()):
        rotary = type(rotary)(config=cfg)
    body.rotary_emb = RotaryTable(rotary)
    if getattr(cfg, "tie_word_embeddings", False):
        cfg.tie_word_embeddings = False  # the output layer has its own blocks now; nothing may re-tie it
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t is not None and t.is_meta]
    if left:
        raise ValueError(f"the gguf backend left tensors without values: {left[:5]}")
    register_attention()
    model.config._attn_implementation = ATTN_IMPL
    for m in model.modules():
        if hasattr(m, "config") and m.config is not cfg:
            m.config._attn_implementation = ATTN_IMPL
    model.eval()
    return model


def to_native(model: nn.Module, types: dict[str, str] | None = None, default: str = "Q8_0") -> nn.Module:
    """Convert an in-process fp32 Qwen2 / Llama model in place: each linear quantized to `types[name suffix]` (e.g.
    {"down_proj": "Q6_K", "lm_head": "Q6_K"}) or `default`. Lossy with respect to the fp32 weights: the model is
    the quantized one afterwards (and batch-invariant)."""
    check_supported(model)
    types = types or {}
    linears = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            t = next((v for k, v in types.items() if name.endswith(k)), default)
            if mod.in_features % TYPES[t].SB:
                raise ValueError(f"{name}: input width {mod.in_features} is not a multiple of {t}'s {TYPES[t].SB}")
            w = decode(t, quantize(mod.weight.data, t), mod.in_features)
            linears[name] = (w, None if mod.bias is None else mod.bias.data)
    emb = model.get_input_embeddings().weight.data
    et = types.get("embed_tokens", default)
    embedding = decode(et, quantize(emb, et), emb.shape[1])
    if "lm_head" not in linears:  # tied and skipped by named_modules' dedup: its own blocks from the same weight
        linears["lm_head"] = (decode(types.get("lm_head", default), quantize(emb, types.get("lm_head", default)),
                                     emb.shape[1]), None)
    norms = {n: p.data for n, p in model.named_parameters() if n.endswith("norm.weight")}
    return install(model, linears, embedding, norms)


def is_native(module: nn.Module) -> bool:
    return any(isinstance(m, NativeLinear) for m in module.modules())


def describe(module: nn.Module) -> str:
    types = Counter(m.type for m in module.modules() if isinstance(m, NativeLinear))
    parts = ", ".join(f"{n} {t}" for t, n in sorted(types.items()))
    return f"native GGUF blocks ({parts}) on the {native.native_path()} path, batch-invariant per row"


def _qkv(layer: nn.Module, h: torch.Tensor) -> list[torch.Tensor]:
    """q, k, v of `h` (..., H), through the layer's fused projections."""
    out = []
    for lin, names in fused_layer(layer)[0]:
        y = lin(h)
        out += [y] if len(names) == 1 else list(y.split(lin.widths, -1))
    return out


def _heads(attn: nn.Module, qkv: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor) -> list[torch.Tensor]:
    """q, k, v (..., T, width) as heads (1, n, T, hd), q and k rotated: one kernel call each, transformers' bits."""
    return [native.heads(t, t.shape[-1] // attn.head_dim, *((cos, sin) if j < 2 else ()))
            for j, t in enumerate(qkv)]


def _mlp(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gu = fused_layer(layer)[1]
    mlp = layer.mlp
    if gu is None:
        return mlp(x)
    g, u = gu(x).split(gu.widths, -1)
    return mlp.down_proj(native.silu_mul(g, u))


def native_step(layers: list[nn.Module]):
    """A `verispec.backends.step.Step` running these native layers (None where a part is not the native one)."""
    from verispec.backends.step import Step

    if not layers or not all(isinstance(ly.input_layernorm, NativeRMSNorm) and isinstance(ly.mlp, NativeMLP)
                             and isinstance(ly.post_attention_layernorm, NativeRMSNorm) for ly in layers):
        return None
    eps = {ly.input_layernorm.variance_epsilon for ly in layers} | {ly.post_attention_layernorm.variance_epsilon
                                                                     for ly in layers}
    attn = layers[0].self_attn
    if len(eps) != 1 or len({(ly.self_attn.head_dim, ly.self_attn.scaling) for ly in layers}) != 1:
        return None

    def projections(layer):
        qkv, gu = fused_layer(layer)
        a, m = layer.self_attn, layer.mlp
        groups = [(lin, list(lin.widths) if len(names) > 1 else [lin.out_features]) for lin, names in qkv]
        gate_up = ([(gu, list(gu.widths))] if gu is not None
                   else [(m.gate_proj, [m.gate_proj.out_features]), (m.up_proj, [m.up_proj.out_features])])
        return groups, gate_up, a.o_proj, m.down_proj

    n_kv = attn.k_proj.out_features // attn.head_dim
    return Step.build(layers, projections, eps.pop(), attn.head_dim, attn.scaling, n_kv)


class NativeDecoder:
    """transformers' Qwen2 / Llama decoder forward on the native modules, without its per-call Python (mask
    construction, output capturing, attention-interface dispatch): the same kernels called on the same tensors in
    the same order, so its hidden states are **bit-identical** to transformers' forward on this backend
    (`tests/test_native.py`) — which is why a target may use it, unlike `verispec.rewrites.lean` (fp32 rounding
    differences). Causal chains on a plain DynamicCache; trees keep transformers' forward (same bits there too)."""

    trees = True  # `ragged` takes tree segments too (the attention kernel reads any mask per row)
    row_exact = True  # a row's results depend on its prefix only: KV entries of a shared prefix may be copied

    def __init__(self, model: nn.Module):
        body = model.get_decoder()
        self.embed, self.layers, self.norm, self.rotary = body.embed_tokens, list(body.layers), body.norm, body.rotary_emb
        # the C++ layer loop of self.layers (verispec.backends.step), built on first use by step_for
        self.make_step = lambda dec: native_step(dec.layers)
        self._step = None

    step_for = LeanDecoder.step_for  # the same slot: built once per layer list, checked on every forward
    step_ragged = LeanDecoder.step_ragged  # a ragged batch (chains and trees) through that loop

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, cache, n_last: int = 1) -> torch.Tensor:
        T = input_ids.shape[1]
        P = cache.get_seq_length()
        x = self.embed(input_ids)  # (1, T, H)
        cos, sin = self.rotary(x, torch.arange(P, P + T).unsqueeze(0))  # (1, T, hd) each
        st = self.step_for(cache)
        if st is not None:  # the loop below in one C++ call: the same kernels on the same values, the same bits
            x = st(x[0].contiguous(), cos[0].contiguous(), sin[0].contiguous(), cache, P)  # (T, H)
            return self.norm(x)[-n_last:]  # (n_last, H)
        allowed = torch.ones(T, P + T, dtype=torch.bool).tril(P).unsqueeze(0)  # (1, T, P + T) causal
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q, k, v = _heads(attn, _qkv(layer, h), cos, sin)  # (1, nh | nkv, T, hd), q and k rotated
            k, v = cache.update(k, v, i)  # (1, nkv, P + T, hd)
            o = native.attention(q, k, v, allowed, attn.scaling)  # (1, T, nh, hd)
            x = x + attn.o_proj(o.reshape(1, T, -1).contiguous())
            x = x + _mlp(layer, layer.post_attention_layernorm(x))
        return self.norm(x[0])[-n_last:]  # (n_last, H): every row normed (per row, so the same bits) for feature taps

    @torch.inference_mode()
    def ragged(self, segs) -> torch.Tensor:
        """Several sequences in one forward (`verispec.cache.Segment`s: new tokens, positions, mask, each on its own
        cache): the linear layers, norms and MLP run once over all rows stacked, attention per sequence. Every
        kernel here is per row, so each row's bits equal those of its solo forward. Returns the final-norm hidden
        states of each segment's last n_out rows, stacked: (sum n_out, H)."""
        spans, at = [], 0
        for s in segs:
            spans.append((at, at + len(s.new), s.causal_mask().unsqueeze(0)))  # mask (1, T, P + T)
            at += len(s.new)
        N = at
        x = self.embed(torch.tensor([t for s in segs for t in s.new], dtype=torch.long))  # (N, H)
        cos, sin = self.rotary(x, torch.tensor([[p for s in segs for p in s.positions]]))  # (1, N, hd) each
        rows = [j for s, (a, b, _) in zip(segs, spans) for j in range(b - s.n_out, b)]
        y = self.step_ragged(segs, x, cos[0], sin[0])  # (N, H): the loop below in one C++ call, the same bits
        if y is not None:
            return self.norm(y)[rows]  # (sum n_out, H)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q, k, v = _heads(attn, _qkv(layer, h), cos, sin)  # (1, nh | nkv, N, hd), q and k rotated
            o = []
            for s, (a, b, allowed) in zip(segs, spans):
                ks, vs = s.lm.cache.update(k[:, :, a:b], v[:, :, a:b], i)  # (1, nkv, P + T, hd)
                o.append(native.attention(q[:, :, a:b], ks, vs, allowed, attn.scaling))  # (1, T, nh, hd)
            x = x + attn.o_proj(torch.cat(o, 1).reshape(N, -1))  # (N, H)
            x = x + _mlp(layer, layer.post_attention_layernorm(x))
        return self.norm(x)[rows]  # (sum n_out, H): every row normed (per row: the same bits) for feature taps
