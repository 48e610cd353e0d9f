"""A decoder forward in one C++ call (`verispec.kernels.native`'s `step`), for the gguf backend's `NativeDecoder` and
the lean drafter forward on "fast-int4": a causal chain, a token tree (a mask per row), or a ragged batch of several
sequences, each on its own cache (`run`: the batched engine's rounds; the linear layers see all rows stacked,
attention runs per sequence).

Why: on a 2-core machine a decoding step of the 1.5B target spent ~11 ms of its ~60 ms outside the linear kernels,
and the 0.5B drafter ~8.5 ms of ~21 ms: per-operation Python and torch dispatch (~25 operations per layer) and the
KV cache's `torch.cat`, which copies the whole cache on every token. Here the layer loop runs in C++ on the same
kernels, and each layer's keys and values live in a buffer with spare rows, written in place.

Bits: for a GGUF model the step calls exactly the kernels `NativeDecoder`'s Python loop calls (qmm, rmsnorm, heads,
attention, silu_mul), on the same values in the same order, so its rows are the same bits (tested); the KV buffer only
changes where the rows live. For a fast-int4 drafter it computes the lean forward's operations with verispec's own
per-row kernels (a drafter's rounding only changes which drafts are accepted).

The cache stays a transformers `DynamicCache`: each layer's `keys` / `values` are views (the first P + T rows) of its
buffer, kept on the layer as `_vs_kbuf` / `_vs_vbuf`. Everything else (crop, index_select for trees, adopting a prefix,
transformers' own forward) works on those views as on any tensor; a later step writes into the buffer only while the
layer's keys are still its leading rows, and otherwise copies them into a fresh buffer once.

Used only where every part is known: each projection a `NativeLinear` (gguf) or an `Int4Linear` on the q4 kernel, no
forward hooks on the layers' modules (a feature tap needs the Python loop), a plain DynamicCache. Otherwise the
callers keep their Python loop. `VERISPEC_NO_STEP=1` turns it off (for A/B timings and per-kernel profiles).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from verispec.backends.native import NativeLinear
from verispec.kernels import native
from verispec.kernels.int4 import WIDE_ROWS, Int4Linear
from verispec.rewrites.fuse import fused_group

_NONE = torch.empty(0)
NO_STEP_ENV = "VERISPEC_NO_STEP"


def _linear_args(lin: nn.Module, widths: list[int], T: list, I: list, F: list) -> bool:
    """Append one projection's entry for plan_new; False where the step cannot run it."""
    if isinstance(lin, NativeLinear):
        SB, GS, bits, mn_scale = lin._fmt
        b = lin._buffers
        I += [0, lin.out_features, SB, GS, bits, len(widths), *widths]
        T += [b["q"], b["sc"], b["mn"], b["D"], b["Dm"], _NONE if b["bias"] is None else b["bias"]]
        F.append(float(mn_scale))
        return True
    if isinstance(lin, Int4Linear) and lin.kernel == "q4":
        bias = lin.bias
        I += [1, lin.out_features, 0, 0, 4, len(widths), *widths]
        T += [lin.packed, lin.scales, lin.mins, _NONE, _NONE,
              _NONE if bias is None else bias.detach().float().contiguous()]
        F.append(0.0)
        return True
    return False


class Step:
    """The C++ forward of one decoder's layers (a plan registered once); `None` from `build` where it cannot run."""

    max_rows = 1 << 62  # forwards of this many new rows or more keep the Python loop

    def __init__(self, mod, plan: int, layers: list[nn.Module], watched: list[nn.Module]):
        self.mod, self.plan, self.layers, self.watched = mod, plan, layers, watched

    def __del__(self):
        try:
            self.mod.plan_free(self.plan)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    @classmethod
    def build(cls, layers: list[nn.Module], projections, norm_eps, head_dim: int, scaling: float,
              n_kv: int) -> "Step | None":
        """projections(layer) -> (qkv, gate_up, o, down): qkv and gate_up lists of (linear, output widths)."""
        mod = native.kernels()[1]
        if mod is None or not hasattr(mod, "step") or not layers or os.environ.get(NO_STEP_ENV) == "1":
            return None
        T: list = []
        I: list = [len(layers), 0, n_kv, head_dim]
        F: list = [float(norm_eps), float(scaling)]
        watched: list[nn.Module] = []
        for layer in layers:
            ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
            w1, w2 = getattr(ln1, "weight", None), getattr(ln2, "weight", None)
            if w1 is None or w2 is None or w1.dtype != torch.float32 or w2.dtype != torch.float32:
                return None
            T += [w1.detach().contiguous(), w2.detach().contiguous()]
            qkv, gate_up, o, down = projections(layer)
            if sum(len(w) for _, w in qkv) != 3 or sum(len(w) for _, w in gate_up) != 2:
                return None
            for group in (qkv, gate_up):
                I.append(len(group))
                for lin, widths in group:
                    if not _linear_args(lin, widths, T, I, F):
                        return None
            for lin in (o, down):
                if not _linear_args(lin, [lin.out_features], T, I, F):
                    return None
            watched += [layer, ln1, ln2, layer.self_attn, layer.mlp] + [m for m, _ in qkv + gate_up] + [o, down]
        try:
            plan = mod.plan_new(T, I, F)
        except RuntimeError:
            return None
        return cls(mod, plan, list(layers), watched)

    def usable(self, layers: list[nn.Module], cache) -> bool:
        """Whether this plan is still the decoder's (same layers, no hooks added since) and the cache is plain."""
        if len(layers) != len(self.layers) or any(a is not b for a, b in zip(layers, self.layers)):
            return False
        if any(m._forward_hooks or m._forward_pre_hooks for m in self.watched):
            return False
        return self.cache_ok(cache)

    def cache_ok(self, cache) -> bool:
        """Whether the cache is a plain DynamicCache with a layer for each of this plan's layers."""
        n = len(self.layers)
        cl = getattr(cache, "layers", None)
        return cl is not None and len(cl) >= n and all(type(c).__name__ == "DynamicLayer" for c in cl[:n])

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache, P: int) -> torch.Tensor:
        """x (T, H) after P cached rows, cos / sin (T, hd): the last layer's output (T, H); the cache is extended."""
        return self.run(x, cos, sin, [(cache, P, x.shape[0], None)])

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segs) -> torch.Tensor:
        """A ragged batch: segs = [(cache, P, T, mask (T, P + T) bool or None for a causal chain)], whose T rows are
        stacked in x (N, H) and cos / sin (N, hd) in that order. Returns the last layer's output (N, H); each cache
        is extended by its own rows."""
        n = len(self.layers)
        kv, Ps, Ts, masks = [], [], [], []
        for cache, P, T, mask in segs:
            for c in cache.layers[:n]:
                kv += ([c.keys, c.values] if P > 0 else [_NONE, _NONE])
                kv += [getattr(c, "_vs_kbuf", _NONE), getattr(c, "_vs_vbuf", _NONE)]
            Ps.append(P)
            Ts.append(T)
            masks.append(_NONE if mask is None else mask.contiguous())
        out = self.mod.step(self.plan, x, cos, sin, Ps, Ts, masks, kv)
        at = 1
        for cache, *_ in segs:
            for c in cache.layers[:n]:
                c._vs_kbuf, c._vs_vbuf, c.keys, c.values = out[at:at + 4]
                at += 4
                if not c.is_initialized:
                    c.dtype, c.device, c.is_initialized = x.dtype, x.device, True
        return out[0]


def int4_step(dec):
    """A `Step` for the layers of a fast-int4 drafter's `verispec.rewrites.lean.LeanDecoder`; None where a projection
    is not on the q4 kernel, or the norms / activation are not Qwen2 / Llama's RMSNorm and SiLU."""
    layers = dec.layers
    eps = set()
    for ly in layers:
        for ln in (ly.input_layernorm, ly.post_attention_layernorm):
            if type(ln).__name__ not in ("Qwen2RMSNorm", "LlamaRMSNorm"):
                return None
            eps.add(float(ln.variance_epsilon))
        if type(ly.mlp.act_fn).__name__ != "SiLUActivation" and getattr(ly.mlp.act_fn, "__name__", "") != "silu":
            return None
    attn = layers[0].self_attn
    if len(eps) != 1:
        return None

    def projections(layer):
        a, m = layer.self_attn, layer.mlp
        qkv, gu = fused_group(a, "q_proj"), fused_group(m, "gate_proj")
        one = lambda lin: (lin, [lin.out_features])  # noqa: E731
        return ([(qkv.linear, list(qkv.sizes))] if qkv is not None else [one(a.q_proj), one(a.k_proj), one(a.v_proj)],
                [(gu.linear, list(gu.sizes))] if gu is not None else [one(m.gate_proj), one(m.up_proj)],
                a.o_proj, m.down_proj)

    n_kv = dec.model.config.num_key_value_heads
    st = Step.build(layers, projections, eps.pop(), attn.head_dim, attn.scaling, n_kv)
    if st is not None:
        st.max_rows = WIDE_ROWS  # wider inputs take the int8 copies (faster there), on the Python loop
    return st
