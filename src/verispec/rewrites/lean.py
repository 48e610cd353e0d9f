"""A lean decoder forward for Llama-family drafters (Qwen2, Llama): the same computation as transformers' forward,
with none of its per-call machinery.

Why: a drafter's draft step is a forward of one or two tokens, and for the 0.5B on "fast-int4" its linear kernels
are only about half of the step. transformers' forward wraps them in per-layer Python (output capturing,
mask construction, kwargs plumbing, attention-interface dispatch), which costs a fixed 1–2 ms per forward whatever
the weights. `python scripts/drafter_forward.py` (0.5B on "fast-int4", 150-token cache, three alternating rounds in
one process) measured T(1): transformers' forward 17.1–17.6 ms with separate projections and 16.3–16.5 ms with
q/k/v and gate/up fused (`verispec.rewrites.fuse`); this forward 15.9–16.3 ms separate and 14.7–15.0 ms fused.

Used only by drafters (`CachedLM(..., lean=True)`, see `verispec.drafters.draft_model`): a drafter's numbers only
decide how many drafts are accepted, never the output, so this path need not reproduce transformers' rounding bit
for bit (it does the same operations; `tests/test_lean.py` checks it agrees to fp32 tolerance). The target always
runs transformers' own forward, so its output stays exactly that of plain decoding.

On "fast-int4" with the q4 kernel, chains of fewer than `WIDE_ROWS` rows go further: the whole layer loop is one C++
call (`verispec.backends.step`, set up by `CachedLM`), with verispec's per-row kernels instead of these torch operations
(other roundings: a drafter's only effect is which drafts are accepted). 0.5B drafter T(1) on the 2-core Intel VM:
21 ms on this Python loop, 15.5 ms on the C++ one.

Scope: causal chains on a plain DynamicCache — token trees (custom masks) keep transformers' forward. A model it
does not know (another `model_type`, sliding-window layers, a missing part) gets `lean_decoder(model) is None`, and
its users fall back to transformers' forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from verispec.rewrites.fuse import FUSABLE_TYPES, fused_group


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class LeanDecoder:
    """Hidden states of the last positions for new tokens on a DynamicCache, transformers' forward without overhead."""

    def __init__(self, model: nn.Module):
        self.model = model
        body = model.get_decoder()
        self.embed, self.layers, self.norm, self.rotary = body.embed_tokens, list(body.layers), body.norm, body.rotary_emb
        self.blocks = [block(layer) for layer in self.layers]

        # make_step(self) -> a C++ loop of these layers or None, set by the caller that knows the backends
        # (`verispec.cache.CachedLM`: `verispec.backends.step.int4_step`); built on first use (False: cannot run)
        self.make_step = None
        self._step = None

    def step_for(self, cache, T: int = 1):
        """The C++ layer loop for T new rows on `cache` where it can run (else None). Built once per layer list (a
        layer-skip view, a shallow copy with fewer layers, builds its own). The gguf backend's NativeDecoder shares
        this method."""
        st = self._step
        if st is None or (st is not False and st.layers != self.layers):
            st = self._step = (self.make_step(self) if self.make_step is not None else None) or False
        return st if st is not False and T < st.max_rows and st.usable(self.layers, cache) else None

    def step_ragged(self, segs, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
        """`ragged`'s layers in one C++ call where the loop can run every segment's cache (else None): x (N, H),
        cos / sin (N, hd) of all segments' rows stacked. Returns the last layer's output (N, H)."""
        st = self.step_for(segs[0].lm.cache, x.shape[0])
        if st is None:
            return None
        parts = []
        for s in segs:
            c, P = s.lm.cache, len(s.lm.ids)
            if c.get_seq_length() != P or (s is not segs[0] and not st.cache_ok(c)):  # (layers, hooks: checked)
                return None
            parts.append((c, P, len(s.new), s.allowed))
        return st.run(x.float().contiguous(), cos.float().contiguous(), sin.float().contiguous(), parts)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, cache, n_last: int = 1) -> torch.Tensor:
        """Feed input_ids (1, T) after the cache's tokens (the cache is extended); return the final-norm hidden
        states of the last n_last positions, (n_last, H)."""
        T = input_ids.shape[1]
        P = cache.get_seq_length()
        x = self.embed(input_ids)  # (1, T, H)
        position_ids = torch.arange(P, P + T, device=x.device).unsqueeze(0)  # (1, T)
        cos, sin = self.rotary(x, position_ids)  # (1, T, hd) each
        st = self.step_for(cache, T)
        if st is not None:  # the loop below in one C++ call (verispec's per-row kernels: not these exact roundings)
            x = st(x[0].float().contiguous(), cos[0].float().contiguous(), sin[0].float().contiguous(), cache, P)
            return self.norm(x[-n_last:])  # (n_last, H)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (1, 1, T, hd): broadcast over heads
        # One new token sees everything cached; T new tokens see the cache and the causal part of themselves.
        mask = None if T == 1 else torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(P)  # (T, P + T)
        for i, (ln1, ln2, attn, mlp, qkv, gate_up) in enumerate(self.blocks):
            hd = attn.head_dim
            q, k, v = qkv(ln1(x))  # (1, T, nh * hd), (1, T, nkv * hd) x 2
            q = q.reshape(1, T, -1, hd).transpose(1, 2)  # (1, nh, T, hd)
            k = k.reshape(1, T, -1, hd).transpose(1, 2)  # (1, nkv, T, hd)
            v = v.reshape(1, T, -1, hd).transpose(1, 2)  # (1, nkv, T, hd)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            k, v = cache.update(k, v, i)  # (1, nkv, P + T, hd) each
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling,
                                               enable_gqa=q.shape[1] != k.shape[1])  # (1, nh, T, hd)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(1, T, -1))  # (1, T, H)
            gate, up = gate_up(ln2(x))  # (1, T, I) each
            x = x + mlp.down_proj(mlp.act_fn(gate) * up)  # (1, T, H)
        return self.norm(x[0, -n_last:])  # (n_last, H)


    @torch.inference_mode()
    def ragged(self, segs) -> torch.Tensor:
        """Several causal chains (`verispec.cache.Segment`s, each on its own cache) in one forward: the linear
        layers over all rows stacked, attention per sequence. A drafter's batched draft step; its rounding may
        differ from the solo forward's (kernels see more rows), which changes only which drafts are accepted.
        Returns the final-norm hidden states of each segment's last n_out rows, stacked: (sum n_out, H)."""
        spans, at = [], 0
        for s in segs:
            T, P = len(s.new), len(s.lm.ids)
            spans.append((at, at + T, None if T == 1 else torch.ones(T, P + T, dtype=torch.bool).tril(P)))
            at += T
        N = at
        x = self.embed(torch.tensor([[t for s in segs for t in s.new]], dtype=torch.long))  # (1, N, H)
        cos, sin = self.rotary(x, torch.tensor([[p for s in segs for p in s.positions]]))  # (1, N, hd) each
        rows = [j for s, (a, b, _) in zip(segs, spans) for j in range(b - s.n_out, b)]
        y = self.step_ragged(segs, x[0], cos[0], sin[0])  # (N, H) or None
        if y is not None:
            return self.norm(y[rows])  # (sum n_out, H)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (1, 1, N, hd)
        for i, (ln1, ln2, attn, mlp, qkv, gate_up) in enumerate(self.blocks):
            hd = attn.head_dim
            q, k, v = qkv(ln1(x))  # (1, N, nh * hd), (1, N, nkv * hd) x 2
            q = q.reshape(1, N, -1, hd).transpose(1, 2)  # (1, nh, N, hd)
            k = k.reshape(1, N, -1, hd).transpose(1, 2)  # (1, nkv, N, hd)
            v = v.reshape(1, N, -1, hd).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            o = []
            for s, (a, b, mask) in zip(segs, spans):
                ks, vs = s.lm.cache.update(k[:, :, a:b], v[:, :, a:b], i)  # (1, nkv, P + T, hd)
                o.append(F.scaled_dot_product_attention(q[:, :, a:b], ks, vs, attn_mask=mask, scale=attn.scaling,
                                                        enable_gqa=q.shape[1] != ks.shape[1]))  # (1, nh, T, hd)
            x = x + attn.o_proj(torch.cat(o, 2).transpose(1, 2).reshape(1, N, -1))  # (1, N, H)
            gate, up = gate_up(ln2(x))  # (1, N, I) each
            x = x + mlp.down_proj(mlp.act_fn(gate) * up)  # (1, N, H)
        return self.norm(x[0, rows])  # (sum n_out, H)


def block(layer: nn.Module) -> tuple:
    """One layer's bundle for LeanDecoder's loop: its norms, attention, MLP and (fused where possible) projections."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv, gate_up = fused_group(attn, "q_proj"), fused_group(mlp, "gate_proj")
    return (layer.input_layernorm, layer.post_attention_layernorm, attn, mlp,
            (lambda h, g=qkv: g.split(g.linear(h))) if qkv is not None
            else (lambda h, a=attn: (a.q_proj(h), a.k_proj(h), a.v_proj(h))),
            (lambda h, g=gate_up: g.split(g.linear(h))) if gate_up is not None
            else (lambda h, m=mlp: (m.gate_proj(h), m.up_proj(h))))


def lean_decoder(model: nn.Module) -> LeanDecoder | None:
    """A LeanDecoder for `model` (cheap: it only holds references), or None where the model is not one it knows.
    Build it after the model's backend is applied: it binds the layers it finds. (A model on the gguf backend takes
    that backend's own `NativeDecoder` instead: `verispec.cache.CachedLM`.)"""
    return LeanDecoder(model) if _supported(model) else None


def _supported(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in FUSABLE_TYPES:
        return False
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or ())):
        return False  # sliding-window layers need a windowed mask
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return False
    try:
        body = model.get_decoder()
        layers = list(body.layers)
        parts = [body.embed_tokens, body.norm, body.rotary_emb, model.get_output_embeddings()]
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            parts += [layer.input_layernorm, layer.post_attention_layernorm, attn.o_proj, attn.q_proj, attn.k_proj,
                      attn.v_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn, attn.head_dim, attn.scaling]
    except (AttributeError, NotImplementedError, TypeError):
        return False
    return bool(layers) and all(p is not None for p in parts)
