"""EAGLE: one trained decoder layer that drafts at the feature level, on the target's own hidden states.

Li et al. 2024, "EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty" (EAGLE-1); Li et al. 2024,
"EAGLE-2: Faster Inference of Language Models with Dynamic Draft Trees"; Li et al. 2025, "EAGLE-3: Scaling up
Inference Acceleration of Large Language Models via Training-Time Test".

The drafter is `fc` plus ONE Llama-style decoder layer (`midlayer`) with its own KV cache. Position i of that layer
reads the pair (feature f_i, token x_{i+1}) and outputs the feature of position i + 1, whose logits predict x_{i+2}.
Two fusions (`fusion=`):

- "eagle1": f_i is the target's final feature (the final norm's output, what its output layer reads).
  x = fc([emb(x_{i+1}) ⊕ f_i]) with fc = Linear(2H, H) (bias, as EAGLE-1), then the layer (no input norm: EAGLE-1's
  first layer skips it, the fc output goes straight in) regresses f_{i+1}. The logits are the target's frozen output
  layer applied to the predicted feature directly: f is already normed, so EAGLE-1 applies no norm there.
- "eagle3": f_i fuses three target hidden states, the *inputs* of layers 2, L//2 and L-3 (the residual stream
  there, vLLM's convention; clamped into [0, L) for tiny targets): g_i = fc([a_2 ⊕ a_{L/2} ⊕ a_{L-3}]),
  fc = Linear(3H, H) without bias. The layer's q/k/v read [input_layernorm(emb) ⊕ hidden_norm(g)] (2H wide), the
  residual is g; its pre-norm output h is fed back, and the logits are lm_head(norm(h)) with the drafter's own `norm`
  (initialised from the target's final norm) and `lm_head` (the target's output rows of the draft vocabulary; frozen
  unless freeze_head=False). This is vLLM's `LlamaForCausalLMEagle3` layout (`export_vllm`).

Both read the token embedding of the NEXT token from the target's embedding table, frozen (never copied or saved).

Drafting (`EagleDrafter`): committed positions carry the target's TRUE features (the engine hands them over through
`take_features`, row i = after tokens[:i + 1]); drafted positions carry the layer's own predicted feature. After each
round the layer's cache is cropped to the committed positions that were fed true features and the newly committed
positions are fed (their true features, not the predicted ones the draft used), so the cache always equals one built
from the committed text alone. The last committed pair's output gives the first draft; then the tree grows as EAGLE-2
does: the root's top_k children, then at every depth each frontier node proposes its top_k children scored by
cumulative log-probability (the draft's softmax, temperature 1), the global top_k become the next frontier (one
forward of the layer per depth, tree attention: a node sees the committed prefix, its ancestors and itself), and
finally the `nodes` best nodes over all depths are kept (a child never outscores its parent: a connected tree).
Depth = the policy's γ. `tree="chain"` drafts the top-1 chain (the policy may stop it early). Drafts are a
deterministic function of the drafter's logits (q = None): the one-hot tree rule keeps the target's law exactly.

Reduced draft vocabulary (EAGLE-3): the N most frequent tokens of the training data; `d2t[i] = used[i] - i` (offset
table: target id = draft id + d2t[draft id]), `t2d` a bool mask over the full vocabulary. Tokens outside are never
drafted, by construction (the logits have no column for them).

Training (`train_heads`, `verispec train eagle`) on a feature store (`verispec.distill`): windows of the target's
sequences; EAGLE-1's loss SmoothL1(predicted feature, true feature) + 0.1 · soft CE against the target's softmax
(restricted to the draft vocabulary), uniform noise U(-0.1, 0.1) on the input features; EAGLE-3's loss the soft CE
alone. Training-time test (EAGLE-3): `ttt_steps` steps, step s feeding the layer's own step s-1 outputs with the
true next tokens, attention to the step-0 keys (causal) plus the same row of earlier steps (exactly what a depth-s
draft node sees at inference), step weights 0.8^s; used for both fusions (ttt_steps=1 is EAGLE-1's recipe).
`warm_start=True` initialises the layer from the target's last decoder layer (see `EagleModel.warm_start`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from verispec.cache import output_width
from verispec.drafters.base import Drafter, bounded_chain
from verispec.drafters.medusa import WEIGHTS, OutputRows, dense_weight, draft_vocabulary, load_heads
from verispec.types import Draft
from verispec.validate import check_int

KIND = "eagle"
FUSIONS = ("eagle1", "eagle3")
FINAL = "final"


# -- target features and the draft vocabulary -------------------------------------------------------------------

def eagle3_layers(n_layers: int) -> tuple[int, int, int]:
    """The layers whose inputs EAGLE-3 fuses: (2, L//2, L-3), clamped into [0, L) so tiny targets work too."""
    return tuple(min(max(i, 0), n_layers - 1) for i in (2, n_layers // 2, n_layers - 3))


def n_layers_of(model: nn.Module) -> int:
    return len(model.get_decoder().layers)


def STORE_SPEC(model: nn.Module) -> tuple:
    """What `verispec train eagle` stores per position: EAGLE-3's three layer inputs, then the final feature (EAGLE-1's
    input, and the target's logits for the soft CE of both fusions)."""
    return (*eagle3_layers(n_layers_of(model)), FINAL)


def d2t_t2d(vocab_ids: torch.Tensor | None, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Draft vocabulary (ascending target ids, None = all) -> (d2t int64 (Vd,), t2d bool (V,)):
    target id = draft id + d2t[draft id]; t2d[t] says whether target token t is in the draft vocabulary."""
    ids = torch.arange(vocab) if vocab_ids is None else vocab_ids.long()
    if len(ids) > 1 and not bool((ids[1:] > ids[:-1]).all()):
        raise ValueError("the draft vocabulary must list target ids in ascending order")
    d2t = ids - torch.arange(len(ids))  # (Vd,)
    t2d = torch.zeros(vocab, dtype=torch.bool)  # (V,)
    t2d[ids] = True
    return d2t, t2d


def vocab_of(d2t: torch.Tensor) -> torch.Tensor:
    """d2t -> the draft vocabulary's target ids (Vd,)."""
    return torch.arange(len(d2t)) + d2t.long()


# -- the model --------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class Attention(nn.Module):
    """Llama attention (no biases) with q/k/v reading `width` features; the caller brings the keys it may see."""

    def __init__(self, cfg: dict, width: int):
        super().__init__()
        H, nh, nkv, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
        self.nh, self.nkv, self.hd = nh, nkv, hd
        self.q_proj = nn.Linear(width, nh * hd, bias=False)
        self.k_proj = nn.Linear(width, nkv * hd, bias=False)
        self.v_proj = nn.Linear(width, nkv * hd, bias=False)
        self.o_proj = nn.Linear(nh * hd, H, bias=False)
        inv = 1.0 / (float(cfg["rope_theta"]) ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        self.register_buffer("inv_freq", inv, persistent=False)  # (hd/2,)

    def rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x (..., N, heads, hd) rotated at positions pos (N,) — HF Llama's rotate-half convention."""
        ang = pos.float()[:, None] * self.inv_freq  # (N, hd/2)
        cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]  # (N, 1, hd)
        x1, x2 = x[..., : self.hd // 2], x[..., self.hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def qkv(self, a: torch.Tensor, pos: torch.Tensor):
        """a (..., N, width) -> q (..., nh, N, hd), k and v (..., nkv, N, hd), rotated."""
        shape = a.shape[:-1]
        q = self.rope(self.q_proj(a).view(*shape, self.nh, self.hd), pos).transpose(-2, -3)  # (..., nh, N, hd)
        k = self.rope(self.k_proj(a).view(*shape, self.nkv, self.hd), pos).transpose(-2, -3)  # (..., nkv, N, hd)
        v = self.v_proj(a).view(*shape, self.nkv, self.hd).transpose(-2, -3)  # (..., nkv, N, hd)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """q (nh, N, hd) over k, v (nkv, P, hd) where allowed (N, P) -> (N, H) after o_proj."""
        g = self.nh // self.nkv  # grouped-query attention: each kv head serves g query heads
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 0), v.repeat_interleave(g, 0),
                                             attn_mask=allowed)  # (nh, N, hd)
        return self.o_proj(out.transpose(0, 1).reshape(q.shape[1], -1))  # (N, H)


class MLP(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        from transformers.activations import ACT2FN

        H, inner = cfg["hidden_size"], cfg["intermediate_size"]
        self.gate_proj = nn.Linear(H, inner, bias=False)
        self.up_proj = nn.Linear(H, inner, bias=False)
        self.down_proj = nn.Linear(inner, H, bias=False)
        self.act = ACT2FN[cfg["hidden_act"]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class EagleLayer(nn.Module):
    """The one decoder layer. Names follow vLLM's EAGLE-3 `midlayer.*` tensors; EAGLE-1 has no input norms."""

    def __init__(self, cfg: dict):
        super().__init__()
        H, eps = cfg["hidden_size"], cfg["rms_norm_eps"]
        self.eagle3 = cfg["fusion"] == "eagle3"
        if self.eagle3:
            self.input_layernorm = RMSNorm(H, eps)  # on the token embedding
            self.hidden_norm = RMSNorm(H, eps)  # on the fused (or fed-back) feature
        self.self_attn = Attention(cfg, 2 * H if self.eagle3 else H)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.mlp = MLP(cfg)


class EagleModel(nn.Module):
    """fc + one decoder layer (+ EAGLE-3's norm and lm_head) over the target's features; `bind(target)` attaches the
    target's frozen embedding table (and, for EAGLE-1, its output layer's draft-vocabulary rows)."""

    def __init__(self, cfg: dict, d2t: torch.Tensor | None = None):
        super().__init__()
        if cfg.get("fusion") not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}; got {cfg.get('fusion')!r}")
        self.cfg = dict(cfg)
        H, V = cfg["hidden_size"], cfg["vocab_size"]
        self.eagle3 = cfg["fusion"] == "eagle3"
        d2t = torch.zeros(V, dtype=torch.long) if d2t is None else d2t.long()
        self.register_buffer("d2t", d2t)  # (Vd,)
        self.register_buffer("t2d", d2t_t2d(vocab_of(d2t), V)[1])  # (V,)
        self.cfg["draft_vocab_size"] = len(d2t)
        self.fc = nn.Linear(3 * H, H, bias=False) if self.eagle3 else nn.Linear(2 * H, H, bias=True)
        self.midlayer = EagleLayer(self.cfg)
        if self.eagle3:
            self.norm = RMSNorm(H, cfg["rms_norm_eps"])
            self.lm_head = nn.Linear(H, len(d2t), bias=False)
        self.embed = self.out = self.bound = None

    # which target features the drafter reads at inference
    @property
    def spec(self) -> tuple:
        return tuple(self.cfg["aux_layers"]) if self.eagle3 else (FINAL,)

    @property
    def vocab_ids(self) -> torch.Tensor | None:
        """Target ids of the draft vocabulary (None: the whole vocabulary, the target's own head serves EAGLE-1)."""
        return None if len(self.d2t) == self.cfg["vocab_size"] and not bool(self.d2t.any()) else vocab_of(self.d2t)

    @classmethod
    def new(cls, target: nn.Module, fusion: str = "eagle3", vocab_ids: torch.Tensor | None = None,
            warm_start: bool = False, freeze_head: bool = True) -> "EagleModel":
        """A fresh model for this target (its hidden size, heads, MLP width, rope base), bound to it."""
        c = target.config
        rope = getattr(c, "rope_theta", None) or (getattr(c, "rope_parameters", None) or {}).get("rope_theta", 1e4)
        L = n_layers_of(target)
        cfg = {"fusion": fusion, "aux_layers": list(eagle3_layers(L)) if fusion == "eagle3" else [],
               "target_layers": L, "hidden_size": c.hidden_size, "num_attention_heads": c.num_attention_heads,
               "num_key_value_heads": getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
               "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
               "intermediate_size": c.intermediate_size, "hidden_act": getattr(c, "hidden_act", "silu"),
               "rms_norm_eps": float(getattr(c, "rms_norm_eps", 1e-6)), "rope_theta": float(rope),
               "max_position_embeddings": int(getattr(c, "max_position_embeddings", 4096)),
               "vocab_size": output_width(target), "warm_start": bool(warm_start),
               "freeze_head": bool(freeze_head)}
        model = cls(cfg, d2t_t2d(vocab_ids, cfg["vocab_size"])[0])
        if model.eagle3:
            with torch.no_grad():
                model.norm.weight.copy_(target.get_decoder().norm.weight.float())
                rows = dense_weight(target.get_output_embeddings())  # (V, H); a packed head dequantized
                model.lm_head.weight.copy_((rows if vocab_ids is None else rows[vocab_ids]).float())
        if warm_start:
            model.warm_start(target)
        model.bind(target, dense=True)
        return model

    @torch.no_grad()
    def warm_start(self, target: nn.Module) -> None:
        """Start the layer as the target's last decoder layer: its attention, MLP and norms copied (EAGLE-3: the
        target's q/k/v weights on the feature half of the 2H input, zeros on the embedding half, so at first the
        next token enters only through training); fc starts as a pass-through of the feature nearest the last layer
        (EAGLE-1: f, EAGLE-3: the input of layer L-3). q/k/v biases of a Qwen2 target are dropped (a Llama layer has
        none). The point (ANCHORS: warm starts matter more than recipes) is a layer that already computes something
        the target computes, instead of a random one."""
        last = target.get_decoder().layers[-1]
        H = self.cfg["hidden_size"]
        mine = self.midlayer
        try:
            for name in ("q_proj", "k_proj", "v_proj"):
                w = dense_weight(getattr(last.self_attn, name)).float()  # (out, H)
                dst = getattr(mine.self_attn, name).weight
                if self.eagle3:
                    dst.zero_()
                    dst[:, H:] = w
                else:
                    dst.copy_(w)
            mine.self_attn.o_proj.weight.copy_(dense_weight(last.self_attn.o_proj).float())
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(mine.mlp, name).weight.copy_(dense_weight(getattr(last.mlp, name)).float())
            mine.post_attention_layernorm.weight.copy_(last.post_attention_layernorm.weight.float())
            if self.eagle3:
                mine.input_layernorm.weight.copy_(last.input_layernorm.weight.float())
                mine.hidden_norm.weight.copy_(last.input_layernorm.weight.float())
        except (AttributeError, RuntimeError) as e:
            raise ValueError(f"warm_start needs a Llama/Qwen2-style last decoder layer with dense weights ({e}); "
                             "load the target with backend='torch'") from e
        self.fc.weight.zero_()
        self.fc.weight[:, -H:] = torch.eye(H)  # the last block: f (EAGLE-1) or the input of layer L-3 (EAGLE-3)
        if self.fc.bias is not None:
            self.fc.bias.zero_()

    def bind(self, target: nn.Module, dense: bool = False) -> "EagleModel":
        """Attach the target's frozen embedding table and (EAGLE-1) output layer; not submodules, so never saved."""
        if target.config.hidden_size != self.cfg["hidden_size"]:
            raise ValueError(f"this EAGLE layer reads {self.cfg['hidden_size']}-wide features; the target's are "
                             f"{target.config.hidden_size}")
        if self.bound is target and (self.out is None or not dense or self.out.full is None):
            return self  # a drafter built per request reuses the binding (EAGLE-1's rows are copied once)
        object.__setattr__(self, "embed", target.get_input_embeddings())
        # EAGLE-1 reads the target's output rows; EAGLE-3 its own lm_head (the target's rows only for training)
        object.__setattr__(self, "out", None if self.eagle3 else OutputRows(target, self.vocab_ids, dense))
        object.__setattr__(self, "bound", target)
        for p in self.parameters():
            p.requires_grad_(True)
        if self.eagle3 and self.cfg.get("freeze_head", True):
            self.lm_head.weight.requires_grad_(False)
        return self

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the target's table, frozen
            return self.embed(ids).float()  # (..., H)

    def fuse(self, feats: torch.Tensor) -> torch.Tensor:
        """The target's features of committed positions -> the layer's hidden input g (EAGLE-3: fc; EAGLE-1: f)."""
        return self.fc(feats) if self.eagle3 else feats  # (..., H)

    def layer_in(self, e: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention input a, residual) from the next token's embedding e and the hidden input g."""
        if self.eagle3:
            ml = self.midlayer
            return torch.cat([ml.input_layernorm(e), ml.hidden_norm(g)], -1), g  # (..., 2H), (..., H)
        x = self.fc(torch.cat([e, g], -1))  # (..., H): EAGLE-1's fc over [emb(x_{t+1}) ⊕ f_t]
        return x, x

    def layer_out(self, residual: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        h = residual + attn
        ml = self.midlayer
        return h + ml.mlp(ml.post_attention_layernorm(h))  # (..., H)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Predicted features (N, H) -> logits over the draft vocabulary (N, Vd)."""
        return self.lm_head(self.norm(h)) if self.eagle3 else self.out(h)

    def target_logits(self, final: torch.Tensor) -> torch.Tensor:
        """The target's own logits over the draft vocabulary from its final features (..., H) -> (..., Vd): the
        soft labels of training (EAGLE-3 keeps the target's rows aside from its own lm_head for that)."""
        if self.out is None:
            object.__setattr__(self, "out", OutputRows(self.bound, self.vocab_ids, dense=True))
        return self.out(final)

    def config(self) -> dict:
        return dict(self.cfg)

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.state_dict())

    @classmethod
    def from_tensors(cls, cfg: dict, tensors: dict[str, torch.Tensor]) -> "EagleModel":
        keys = ("fusion", "aux_layers", "target_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                "head_dim", "intermediate_size", "hidden_act", "rms_norm_eps", "rope_theta",
                "max_position_embeddings", "vocab_size", "warm_start", "freeze_head")
        if "d2t" not in tensors:
            raise ValueError("the EAGLE weights lack d2t (not an EAGLE drafter folder?)")
        model = cls({k: cfg[k] for k in keys if k in cfg}, tensors["d2t"])
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ValueError(f"the EAGLE weights do not match their config (missing {missing}, unexpected "
                             f"{unexpected})")
        return model.eval()


# -- EAGLE-2 tree growth ----------------------------------------------------------------------------------------

def grow_tree(expand, depth: int, top_k: int, stop: frozenset[int] = frozenset()
              ) -> tuple[list[int], list[int], list[float]]:
    """EAGLE-2's expansion. expand(frontier, nodes, parents) -> (F, Vd) logits at each frontier node (-1 = the root);
    returns every proposed node's (token, parent, cumulative log-probability). Each depth: every frontier node
    proposes its top_k children, the global top_k of them become the next frontier (stop tokens are not expanded:
    nothing after one can be kept)."""
    nodes: list[int] = []
    parents: list[int] = []
    score: list[float] = []
    frontier = [-1]
    for _ in range(depth):
        logq = torch.log_softmax(expand(frontier, nodes, parents).float(), -1)  # (F, Vd)
        top = logq.topk(min(top_k, logq.shape[-1]), dim=-1)  # (F, k) values and indices
        base = torch.tensor([0.0 if f < 0 else score[f] for f in frontier])[:, None]  # (F, 1)
        cand = (base + top.values).flatten()  # (F * k,) cumulative scores of every proposed child
        best = cand.topk(min(top_k, cand.numel())).indices.tolist()
        nxt = []
        for c in sorted(best):  # by parent, then rank: parents are listed before their children
            fi, j = divmod(c, top.indices.shape[1])
            nodes.append(int(top.indices[fi, j]))
            parents.append(frontier[fi])
            score.append(float(cand[c]))
            if nodes[-1] not in stop:
                nxt.append(len(nodes) - 1)
        frontier = nxt
        if not frontier:
            break
    return nodes, parents, score


def best_subtree(nodes: list[int], parents: list[int], score: list[float], n: int) -> tuple[list[int], list[int]]:
    """The n best nodes over all depths, re-indexed (tokens, parents). A child's score never exceeds its parent's and
    ties keep index order (parents first), so the kept set is a connected tree."""
    keep = sorted(sorted(range(len(nodes)), key=lambda i: -score[i])[:n])
    new = {old: i for i, old in enumerate(keep)}
    return [nodes[i] for i in keep], [-1 if parents[i] < 0 else new[parents[i]] for i in keep]


# -- the drafter ------------------------------------------------------------------------------------------------

class EagleDrafter(Drafter):
    """Drafts an EAGLE-2 dynamic tree (or tree="chain", the top-1 chain) with the EAGLE layer and its own KV cache."""

    name = KIND

    def __init__(self, model: EagleModel, tree: str = "dynamic", top_k: int = 4, nodes: int = 16,
                 stop_ids: frozenset[int] = frozenset()):
        if tree not in ("dynamic", "chain"):
            raise ValueError(f"eagle tree must be 'dynamic' (EAGLE-2) or 'chain'; got {tree!r}")
        self.model, self.chain = model.eval(), tree == "chain"
        self.top_k, self.nodes = check_int("top_k", top_k, 1), check_int("nodes", nodes, 1)
        self.target_features = model.spec  # the engine tracks these on the target for us
        self.stop_ids = frozenset(stop_ids)
        t2d = model.t2d
        cum = torch.cumsum(t2d.long(), 0) - 1  # target id -> draft id where t2d (stop tokens are not expanded)
        self.stop_draft = frozenset(int(cum[t]) for t in self.stop_ids if 0 <= t < len(t2d) and bool(t2d[t]))
        self.vocab = vocab_of(model.d2t)  # (Vd,) draft id -> target id
        self.forwards = self.prefill_forwards = self.tokens_processed = 0
        self._reset()

    @classmethod
    def from_ctx(cls, ctx) -> "EagleDrafter":
        from verispec.drafters.folder import prepared

        opts = dict(ctx.options)
        source = opts.pop("heads", None)
        weights = opts.pop("weights", "auto")
        kw = {k: opts.pop(k) for k in ("tree", "top_k", "nodes") if k in opts}
        if opts:
            raise ValueError(f"unknown eagle option(s): {', '.join(opts)}")
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}; got {weights!r}")

        def build() -> EagleModel:
            model, _ = load_heads(source, ctx.target, KIND, cls=EagleModel)
            L = n_layers_of(ctx.target.model)
            if model.eagle3 and L != model.cfg["target_layers"]:
                raise ValueError(f"this EAGLE-3 layer fuses layers {model.cfg['aux_layers']} of a "
                                 f"{model.cfg['target_layers']}-layer target; this target has {L}")
            model = model.bind(ctx.target.model)
            if weights == "int4" or (weights == "auto" and not isinstance(source, nn.Module)):
                # the layer, fc and output rows on the int4 kernel: a draft step reads ~1/6 of the fp32 bytes (the
                # drafts may change; what the verifier keeps does not). A caller's object is copied first.
                from verispec.kernels.int4 import quantize_linears

                if isinstance(source, nn.Module):
                    model = EagleModel.from_tensors(model.cfg, model.tensors()).bind(ctx.target.model)
                # EAGLE-3's fc stays fp32: it reads the target's raw residual stream, whose few huge channels an
                # int8 activation copy (the wide path, >= 16 rows: the prompt) flattens to garbage, and it runs once
                # per committed position, not per draft step (measured: teacher-forced top-1 0.60 -> 0.05 on
                # HumanEval)
                quantize_linears(model, keep=("fc",) if model.eagle3 else ())
                if model.out is not None:
                    model.out.quantize()
            return model.eval()

        # a folder's drafter is read, checked and quantized once per target, not per request
        return cls(prepared(ctx.target, KIND, source, (weights,), build), stop_ids=ctx.stop_ids, **kw)

    def _reset(self) -> None:
        cfg = self.model.cfg
        self.K = torch.empty(cfg["num_key_value_heads"], 0, cfg["head_dim"])  # (nkv, P, hd) committed entries
        self.V = self.K.clone()
        self.ids: list[int] = []  # the committed tokens the cache stands for (pair i holds tokens[i + 1])
        self.n_true = 0  # cache entries fed with the target's true features
        self.pending = None  # (n, F) true features of committed positions not yet fed
        self.root = None  # (h (H,), logits (Vd,)) at the last committed pair: the first draft's
        self._feats = None

    def take_features(self, features):
        self._feats = features  # consumed right away by prefill / commit (before any other target forward)

    def _stash(self, tokens) -> None:
        """Keep the cache's committed entries that still agree with `tokens` and copy the true features of the
        positions to feed next (at least the last pair: its output is the first draft)."""
        feats, self._feats = self._feats, None
        if feats is None or len(feats) < len(tokens) - 1:
            raise RuntimeError("the EAGLE drafter needs the target's features of every committed position but the "
                               "pending one (the engine's take_features)")
        feats = feats[: len(tokens) - 1]  # the target may also have cached the pending token (a draft it kept)
        m = 0
        for a, b in zip(self.ids, tokens):
            if a != b:
                break
            m += 1
        keep = max(0, min(self.n_true, m - 1, len(tokens) - 2))  # pair i needs tokens[i + 1] to agree
        self.K, self.V = self.K[:, :keep], self.V[:, :keep]
        self.n_true, self.ids = keep, list(tokens[: keep + 1])
        self.pending = feats[keep:].clone() if len(tokens) >= 2 else None  # (n, F)
        self.root = None

    def prefill(self, tokens):
        feats = self._feats  # handed over just before (the engine's feed_features): keep it across the reset
        self._reset()
        self._feats = feats
        self._stash(tokens)
        before = self.forwards
        self._feed(tokens)
        self.prefill_forwards += self.forwards - before
        self.forwards = before

    def commit(self, tokens, draft, result):
        self._stash(tokens)

    @torch.inference_mode()
    def _feed(self, tokens) -> None:
        """Feed the pending committed pairs (true feature f_i, token x_{i+1}) into the cache; the last output is
        the root of the next draft."""
        if self.pending is None or len(self.pending) == 0:
            return
        m = self.model
        n0, n = self.n_true, len(self.pending)
        pos = torch.arange(n0, n0 + n)  # (n,)
        e = m.embed_tokens(torch.tensor(tokens[n0 + 1: n0 + 1 + n]))  # (n, H) the next tokens
        a, res = m.layer_in(e, m.fuse(self.pending.float()))  # (n, 2H | H), (n, H)
        q, k, v = m.midlayer.self_attn.qkv(a, pos)  # (nh, n, hd), (nkv, n, hd)
        self.K, self.V = torch.cat([self.K, k], 1), torch.cat([self.V, v], 1)  # (nkv, P, hd)
        allowed = torch.ones(n, n0 + n, dtype=torch.bool).tril(n0)  # (n, P) causal
        h = m.layer_out(res, m.midlayer.self_attn.attend(q, self.K, self.V, allowed))  # (n, H)
        self.n_true, self.ids, self.pending = n0 + n, list(tokens[: n0 + n + 1]), None
        self.root = (h[-1], m.logits(h[-1:])[0])  # (H,), (Vd,)
        self.forwards += 1
        self.tokens_processed += n

    @torch.inference_mode()
    def _nodes(self, toks: list[int], hid: torch.Tensor, depth: list[int], anc: list[list[int]]) -> torch.Tensor:
        """Feed draft nodes (draft ids toks, fed-back features hid (F, H), depths, the tree-cache indices of each
        one's ancestors) after the committed cache and the tree nodes fed so far; returns their outputs (F, H)."""
        m = self.model
        P, T, Fn = self.n_true, self.tK.shape[1], len(toks)
        pos = torch.tensor([P - 1 + d for d in depth])  # (F,): the root pair sits at P - 1
        e = m.embed_tokens(self.vocab[torch.tensor(toks)])  # (F, H)
        a, res = m.layer_in(e, hid)
        q, k, v = m.midlayer.self_attn.qkv(a, pos)
        self.tK, self.tV = torch.cat([self.tK, k], 1), torch.cat([self.tV, v], 1)  # (nkv, T + F, hd)
        allowed = torch.zeros(Fn, P + T + Fn, dtype=torch.bool)  # (F, P + T + F)
        allowed[:, :P] = True
        for i, an in enumerate(anc):  # a node sees the committed prefix, its ancestors and itself
            allowed[i, [P + j for j in an]] = True
            allowed[i, P + T + i] = True
        kk, vv = torch.cat([self.K, self.tK], 1), torch.cat([self.V, self.tV], 1)
        self.forwards += 1
        self.tokens_processed += Fn
        return m.layer_out(res, m.midlayer.self_attn.attend(q, kk, vv, allowed))  # (F, H)

    @torch.inference_mode()
    def propose(self, tokens, gamma, policy, sampling, generator) -> Draft:
        self._feed(tokens)
        if self.root is None or gamma < 1 or self.ids != list(tokens):
            return Draft([], None, self.name)
        nkv, hd = self.K.shape[0], self.K.shape[2]
        self.tK, self.tV = torch.empty(nkv, 0, hd), torch.empty(nkv, 0, hd)  # this round's tree entries
        root_h, root_logits = self.root
        m = self.model
        if self.chain:
            return self._chain(root_h, root_logits, gamma, policy)
        out_h: dict[int, torch.Tensor] = {}  # node -> its output feature (for its children's input)
        slot: dict[int, int] = {}  # node -> index in the tree cache

        def expand(frontier, nodes, parents):
            if frontier == [-1]:
                return root_logits[None]  # (1, Vd): from the last committed pair
            hid = torch.stack([root_h if parents[f] < 0 else out_h[parents[f]] for f in frontier])  # (F, H)
            anc, depth = [], []
            for f in frontier:
                chain, j = [], parents[f]
                while j >= 0:
                    chain.append(slot[j])
                    j = parents[j]
                anc.append(chain)
                depth.append(len(chain) + 1)
            T = self.tK.shape[1]
            h = self._nodes([nodes[f] for f in frontier], hid, depth, anc)  # (F, H)
            for i, f in enumerate(frontier):
                out_h[f], slot[f] = h[i], T + i
            return m.logits(h)  # (F, Vd)

        nodes, parents, score = grow_tree(expand, gamma, self.top_k, self.stop_draft)
        toks, par = best_subtree(nodes, parents, score, self.nodes)
        return Draft(self.vocab[torch.tensor(toks, dtype=torch.long)].tolist(), None, self.name, parents=par)

    def _chain(self, root_h, root_logits, gamma, policy) -> Draft:
        m = self.model

        def steps():
            hid, logits, anc = root_h, root_logits, []
            while True:
                d = int(logits.argmax())
                yield int(self.vocab[d]), None, logits
                h = self._nodes([d], hid[None], [len(anc) + 1], [list(anc)])  # (1, H)
                anc.append(self.tK.shape[1] - 1)
                hid, logits = h[0], m.logits(h)[0]

        x, _ = bounded_chain(steps(), gamma, policy, self.stop_ids)
        return Draft(x, None, self.name)


# -- training ---------------------------------------------------------------------------------------------------

def split_features(spec: tuple, fusion: str, width: int) -> tuple[slice | list, slice]:
    """Columns of a store's rows (features in `spec` order, H each) that feed `fusion`, and those of the final
    feature (the soft CE's target logits; EAGLE-1's regression target)."""
    spec = tuple(FINAL if s == FINAL else int(s) for s in spec)
    if FINAL not in spec:
        raise ValueError(f"an EAGLE store needs the final feature (the target's logits); this one holds {spec}")
    H = width // len(spec)
    fin = spec.index(FINAL)
    final = slice(fin * H, (fin + 1) * H)
    if fusion == "eagle1":
        return final, final
    aux = [s for s in spec if s != FINAL]
    if len(aux) != 3:
        raise ValueError(f"EAGLE-3 fuses three layer inputs; the store holds {spec} (build it with eagle.STORE_SPEC)")
    cols = [c for j, s in enumerate(spec) if s != FINAL for c in range(j * H, (j + 1) * H)]
    return cols, final


def window_batch(sequences, picks: np.ndarray, width: int, inp_cols, fin_cols, noise: float = 0.0,
                 rng: np.random.Generator | None = None):
    """Windows (sequence, start) of `width` positions -> tokens (B, W) long, input features (B, W, Fi) with uniform
    noise of that width (EAGLE-1: 0.2, i.e. U(-0.1, 0.1)), final features (B, W, H)."""
    toks = np.stack([np.asarray(sequences[s][0][i: i + width], dtype=np.int64) for s, i in picks])  # (B, W)
    rows = np.stack([np.asarray(sequences[s][1][i: i + width], dtype=np.float32) for s, i in picks])  # (B, W, F)
    inp, fin = rows[..., inp_cols], rows[..., fin_cols]
    if noise:
        inp = inp + (rng.random(inp.shape, dtype=np.float32) - 0.5) * noise
    return torch.from_numpy(toks), torch.from_numpy(np.ascontiguousarray(inp)), torch.from_numpy(
        np.ascontiguousarray(fin))


def ttt_forward(model: EagleModel, tokens: torch.Tensor, inp: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Training-time test over windows: tokens (B, W), input features (B, W, Fi). Row j of step 0 is the pair
    (true feature of position j, token j+1) at position j; row j of step s the pair (step s-1's output at row j,
    token j+1+s) at position j+s, attending to step-0 rows 0..j (causal) and row j of steps 1..s: what a depth-s
    draft node sees at inference. Returns the outputs h_s (B, W-1, H) of each step (row j predicts token j+2+s)."""
    B, W = tokens.shape
    R = W - 1
    m, at = model, model.midlayer.self_attn
    e = m.embed_tokens(tokens)  # (B, W, H)
    rows = torch.arange(R)
    hid = m.fuse(inp[:, :R])  # (B, R, H)
    causal = torch.ones(R, R, dtype=torch.bool).tril()  # (R, R)
    g = at.nh // at.nkv
    Ks, Vs, outs = [], [], []
    for s in range(steps):
        a, res = m.layer_in(e[:, (rows + 1 + s).clamp(max=W - 1)], hid)  # rows past the window are masked in the loss
        q, k, v = at.qkv(a, rows + s)  # (B, nh, R, hd), (B, nkv, R, hd)
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)  # (B, nh, R, hd)
        if s == 0:
            K0, V0 = k, v
        else:
            Ks.append(k)
            Vs.append(v)
        scale = 1.0 / math.sqrt(at.hd)
        s0 = (q @ K0.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf"))  # (B, nh, R, R)
        diag = [(q * kt).sum(-1, keepdim=True) * scale for kt in Ks]  # s x (B, nh, R, 1)
        p = torch.softmax(torch.cat([s0, *diag], -1), -1)  # (B, nh, R, R + s)
        o = p[..., :R] @ V0 + sum(p[..., R + t: R + t + 1] * vt for t, vt in enumerate(Vs))  # (B, nh, R, hd)
        o = at.o_proj(o.transpose(1, 2).reshape(B, R, -1))  # (B, R, H)
        h = m.layer_out(res, o)  # (B, R, H)
        outs.append(h)
        hid = h
    return outs


def eagle_loss(model: EagleModel, tokens: torch.Tensor, inp: torch.Tensor, final: torch.Tensor, steps: int = 1,
               decay: float = 0.8, w_cls: float = 0.1) -> torch.Tensor:
    """EAGLE-1: Σ_s 0.8^s (SmoothL1(h_s, f) + 0.1 · CE(p, p̂)); EAGLE-3: Σ_s 0.8^s CE(p, p̂), p the target's
    softmax over the draft vocabulary at the predicted position (soft labels, as both papers)."""
    B, W = tokens.shape
    R = W - 1
    rows = torch.arange(R)
    with torch.no_grad():  # the target's distribution over the draft vocabulary at every position
        p_all = torch.softmax(model.target_logits(final), -1)  # (B, W, Vd)
    total = final.new_zeros(())
    for s, h in enumerate(ttt_forward(model, tokens, inp, steps)):
        at = (rows + 1 + s).clamp(max=W - 1)
        ok = (rows + 1 + s <= W - 1).float()[None].expand(B, R)  # (B, R) rows whose target is in the window
        if not ok.any():
            break
        ce = -(p_all[:, at] * torch.log_softmax(model.logits(h), -1)).sum(-1)  # (B, R)
        loss = (ce * ok).sum() / ok.sum()
        if model.eagle3:
            total = total + decay ** s * loss
        else:
            reg = F.smooth_l1_loss(h, final[:, at], reduction="none").mean(-1)  # (B, R)
            total = total + decay ** s * ((reg * ok).sum() / ok.sum() + w_cls * loss)
    return total


@torch.no_grad()
def step_accuracy(model: EagleModel, tokens, inp, final, steps: int) -> list[float]:
    """Share of rows where step s's top-1 draft is the target's top-1 token (teacher-forced: the chance that a
    depth-s draft is right given the earlier ones were)."""
    B, W = tokens.shape
    R = W - 1
    rows = torch.arange(R)
    ids = model.vocab_ids
    head = model.bound.get_output_embeddings()
    want = head(final).argmax(-1)  # (B, W) the target's greedy next token at every position
    acc = []
    for s, h in enumerate(ttt_forward(model, tokens, inp, steps)):
        ok = rows + 1 + s <= W - 1
        if not ok.any():
            break
        got = model.logits(h[:, ok]).argmax(-1)  # (B, r) draft ids
        got = got if ids is None else ids[got]
        acc.append(float((got == want[:, (rows + 1 + s)[ok]]).float().mean()))
    return acc


def train_heads(target, store, out: str | Path | None = None, *, fusion: str | None = None, steps: int = 600,
                batch: int = 256, window: int = 64, lr: float = 3e-4, ttt_steps: int | None = None,
                n_heads: int | None = None, draft_vocab: int | None = 16384, warm_start: bool = False,
                freeze_head: bool = True, noise: float | None = None, minutes: float | None = None,
                tokens: int | None = None, seed: int = 0, workdir: str | Path | None = None,
                progress: bool = True) -> dict:
    """Train an EAGLE layer on a feature store of this target and write a drafter folder to `out` (None: only
    return). fusion: "eagle1" | "eagle3" (default: eagle3 when the store holds EAGLE-3's layer inputs). batch: tokens
    per step (batch // window windows of `window` positions). ttt_steps: training-time-test steps (default n_heads,
    the CLI's --heads, else 1 for EAGLE-1 and 3 for EAGLE-3). Returns a summary (steps, tokens, losses, held-out
    top-1 agreement with the target per draft depth, the folder)."""
    from verispec.distill import load_sequences, open_store_for
    from verispec.drafters.folder import save_drafter
    from verispec.training import train

    target, info, fp = open_store_for(target, store)
    has_aux = any(s != FINAL for s in info.spec)
    fusion = fusion or ("eagle3" if has_aux else "eagle1")
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}; got {fusion!r}")
    want = eagle3_layers(n_layers_of(target.model))
    if fusion == "eagle3" and tuple(int(s) for s in info.spec if s != FINAL) != want:
        raise ValueError(f"EAGLE-3 fuses the inputs of layers {want}; the store holds {info.spec}")
    inp_cols, fin_cols = split_features(info.spec, fusion, info.width)
    ttt_steps = ttt_steps or n_heads or (3 if fusion == "eagle3" else 1)
    check_int("steps", steps, 1)
    check_int("ttt_steps", ttt_steps, 1)
    noise = (0.2 if fusion == "eagle1" else 0.0) if noise is None else noise
    sequences = load_sequences(info)
    W = min(window, min(len(t) for t, _ in sequences))
    if W < 3:
        raise ValueError(f"the feature store {info.path} has sequences too short to train on ({W} tokens)")
    V = output_width(target.model)
    vocab_ids = draft_vocabulary(sequences, draft_vocab, V)
    starts = np.array([(s, i) for s, (t, _) in enumerate(sequences) for i in range(0, len(t) - W + 1, max(1, W // 2))],
                      dtype=np.int64)  # half-overlapping windows
    rng = np.random.default_rng(seed)
    rng.shuffle(starts)
    # held-out windows from held-out sequences (windows overlap by half: a window split would leak)
    held_seq = set(rng.permutation(len(sequences))[: len(sequences) // 10].tolist())
    if held_seq:
        is_held = np.array([s in held_seq for s in starts[:, 0]])
        held, train_rows = starts[is_held][:32], starts[~is_held]
    else:
        n_held = max(1, min(32, len(starts) // 10))
        held, train_rows = starts[:n_held], starts[n_held:]
    n_held = len(held)
    if len(train_rows) == 0:
        raise ValueError(f"the feature store {info.path} is too small to train on ({len(starts)} windows)")
    n_win = max(1, batch // W)
    torch.manual_seed(seed)
    model = EagleModel.new(target.model, fusion, vocab_ids, warm_start=warm_start, freeze_head=freeze_head)

    def make_batch(step: int):
        g = np.random.default_rng([seed, step])  # a pure function of the step: resumes reproduce the run
        pick = train_rows[g.integers(0, len(train_rows), n_win)]
        return (n_win * (W - 1), *window_batch(sequences, pick, W, inp_cols, fin_cols, noise, g))

    report = train(model, make_batch, lambda m, *b: eagle_loss(m, *b, steps=ttt_steps), steps=steps, lr=lr,
                   workdir=workdir, minutes=minutes, tokens=tokens, warmup=max(1, steps // 20), progress=progress,
                   label=f"train {KIND} ({fusion})")
    acc = step_accuracy(model, *window_batch(sequences, held, W, inp_cols, fin_cols), steps=max(ttt_steps, 4))
    summary = {"fusion": fusion, "warm_start": warm_start, "ttt_steps": ttt_steps, "window": W,
               "draft_vocab_size": int(len(model.d2t)), "steps": report.steps, "tokens": report.tokens,
               "minutes": round(report.seconds / 60, 2), "stopped_by": report.stopped_by,
               "resumed_from": report.resumed_from, "loss_first": report.losses[0] if report.losses else None,
               "loss_last": float(np.mean(report.losses[-20:])) if report.losses else None,
               "store_tokens": info.tokens, "held_out_windows": int(n_held),
               "top1_by_depth": [round(a, 4) for a in acc],
               # a planning estimate (teacher-forced per-depth agreement, chained), not a measured acceptance
               "planned_chain_tokens": round(1 + sum(math.prod(acc[: d + 1]) for d in range(len(acc))), 3)}
    if out is not None:
        cfg = {**model.config(), "training": summary,
               "recipe": {"steps": steps, "batch": batch, "window": W, "lr": lr, "seed": seed, "noise": noise}}
        summary["folder"] = str(save_drafter(out, KIND, cfg, model.tensors(), target.name, fp))
    summary["heads"] = model
    return summary


def fit_to_text(target: nn.Module, ids: list[int], fusion: str = "eagle1", steps: int = 40, lr: float = 1e-2,
                ttt_steps: int = 2, vocab_ids: torch.Tensor | None = None, seed: int = 0) -> EagleModel:
    """An EAGLE layer fitted for a few full-batch steps to one text of this target, in memory (tests, demos)."""
    from verispec.cache import CachedLM

    torch.manual_seed(seed)
    model = EagleModel.new(target, fusion, vocab_ids)
    spec = STORE_SPEC(target)
    lm = CachedLM(target)
    lm.track_features(spec)
    lm.prefill(ids)
    feats = lm.features.clone()  # (T, F)
    lm.untrack_features()
    inp_cols, fin_cols = split_features(spec, fusion, feats.shape[1])
    batch = window_batch([(np.asarray(ids), feats.numpy())], np.array([[0, 0]]), len(ids), inp_cols, fin_cols)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        eagle_loss(model, *batch, steps=ttt_steps).backward()
        opt.step()
    return model.eval()


# -- export -----------------------------------------------------------------------------------------------------

def export_vllm(folder: str | Path, out: str | Path, target=None) -> Path:
    """Write an EAGLE-3 drafter folder in vLLM's `LlamaForCausalLMEagle3` layout (the format of the EAGLE-3 authors'
    checkpoints; vLLM: `--speculative-config '{"model": OUT, "method": "eagle3", ...}'`): config.json and
    model.safetensors with midlayer.*, fc.weight (H, 3H), norm.weight, lm_head.weight (Vd, H), d2t int64 and t2d
    bool. The token embedding is not written: vLLM then shares the target's. EAGLE-1 folders are refused (vLLM's
    EAGLE-1 layout is another architecture). target (optional, a model or name): refuse a folder trained for another."""
    from safetensors.torch import save_file

    from verispec.drafters.folder import load_drafter

    if target is not None and not isinstance(target, nn.Module):
        from verispec.models.load import load_model

        target = load_model(target).model
    cfg, tensors, path = load_drafter(folder, KIND, target)
    if cfg.get("fusion") != "eagle3":
        raise ValueError(f"{path} holds an EAGLE-1 layer (fusion {cfg.get('fusion')!r}); vLLM's EAGLE-3 layout "
                         "needs fusion='eagle3' (train with `verispec train eagle` on an EAGLE-3 store)")
    model = EagleModel.from_tensors(cfg, tensors)  # checks the tensors against the config
    H, L = cfg["hidden_size"], cfg["target_layers"]
    layers = list(cfg["aux_layers"])
    if layers != [2, L // 2, L - 3]:
        raise ValueError(f"the layer fuses target layers {layers} (clamped for a {L}-layer target); vLLM takes "
                         f"(2, L//2, L-3) = {[2, L // 2, L - 3]}")
    state = model.state_dict()
    weights = {k: v.detach().contiguous() for k, v in state.items() if k not in ("d2t", "t2d")}
    weights["d2t"] = model.d2t.long().contiguous()  # (Vd,) int64
    weights["t2d"] = model.t2d.bool().contiguous()  # (V,) bool
    config = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "num_hidden_layers": 1,
              "hidden_size": H, "intermediate_size": cfg["intermediate_size"],
              "num_attention_heads": cfg["num_attention_heads"], "num_key_value_heads": cfg["num_key_value_heads"],
              "head_dim": cfg["head_dim"], "hidden_act": cfg["hidden_act"], "rms_norm_eps": cfg["rms_norm_eps"],
              "rope_theta": cfg["rope_theta"], "rope_scaling": None,
              "max_position_embeddings": cfg["max_position_embeddings"], "vocab_size": cfg["vocab_size"],
              "draft_vocab_size": int(len(model.d2t)), "attention_bias": False, "mlp_bias": False,
              "tie_word_embeddings": False, "torch_dtype": "float32",
              "eagle_config": {"use_aux_hidden_state": True, "eagle_aux_hidden_state_layer_ids": layers},
              "verispec": {"source": str(path), "target": cfg.get("target")}}

    def write(tmp: Path) -> None:
        save_file(weights, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=1))

    from verispec.export import _atomic_dir

    return _atomic_dir(out, write)  # a new folder, renamed into place: a failed export leaves nothing
