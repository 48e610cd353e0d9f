"""ParallelSpec: the draft model emits k draft tokens in ONE forward, by reading k − 1 trained mask tokens.

Xiao et al. 2024, "ParallelSpec: Parallel Drafter for Efficient Speculative Decoding"; An et al. 2025 (PARD) is
the same idea with one shared mask token. The drafter is fed the committed tokens the cache lacks, then the
pending token x_n, then mask tokens [M]_1 .. [M]_{k−1} at positions n + 1 .. n + k − 1 (causal attention: mask i
sees the prefix and masks < i). Row 0 (x_n) is the drafter's ordinary next-token distribution q_1; the row of
[M]_i gives q_{i+1}, its guess of the token i + 1 places after x_n without knowing the tokens in between. The
mask rows are dropped from the drafter's cache by the next round's rollback (their ids never match a real token),
so a round costs one drafter forward of (accepted + 1) + (k − 1) rows instead of k sequential forwards: the draft
cost per round stops growing with γ.

What is trained (self-distillation, `verispec train parallelspec`): the k − 1 mask embeddings, per mask a
Medusa-style residual block h + SiLU(W h) (W zero-initialised) on the drafter's final-norm hidden state before its
own frozen output layer, and (`--train-layers L`, the issue's "fine-tune the last layers") the drafter's last L
decoder layers. Untuned layers stay the file's; tuned layers are stored in the drafter folder in fp32 and, on the
gguf backend, drafted with as Q8_0 blocks (the paper fine-tunes the whole drafter). Labels are the target's own
greedy / sampled completions of standard-library prompts (the feature store of `verispec.distill`; only its tokens
are read); mask i also learns the drafter's own distribution at the real position (KL), and with tuned layers the
real rows keep learning the target's next token (the drafter's first draft depends on them).

Lossless: x_{i+1} is drawn from q_{i+1} (a function of the prefix only) and exactly that q goes to the verifier;
a q that ignores the earlier draft tokens is still the law the token was drawn from given them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from verispec.cache import CachedLM
from verispec.drafters.base import ModelDrafter, bounded_chain
from verispec.sampling import sample
from verispec.types import Draft
from verispec.validate import check_int

KIND = "parallelspec"


class Residual(nn.Module):
    """Medusa's head block, h + SiLU(W h); W starts at zero (the block starts as the identity)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + nn.functional.silu(self.linear(h))


class MaskHeads(nn.Module):
    """What ParallelSpec trains: n_masks input embeddings (mask i stands for "the token i + 1 places ahead") and
    one residual block per mask on the final hidden state of its row."""

    def __init__(self, hidden: int, n_masks: int = 4, init: torch.Tensor | None = None):
        super().__init__()
        check_int("n_masks", n_masks, 1)
        self.hidden, self.n_masks = hidden, n_masks
        start = torch.zeros(n_masks, hidden) if init is None else init.detach().float().expand(n_masks, hidden)
        self.masks = nn.Parameter(start.clone())  # (M, H)
        self.blocks = nn.ModuleList(Residual(hidden) for _ in range(n_masks))

    def config(self) -> dict:
        return {"hidden_size": self.hidden, "num_masks": self.n_masks}

    @classmethod
    def from_tensors(cls, cfg: dict, tensors: dict[str, torch.Tensor]) -> "MaskHeads":
        heads = cls(int(cfg["hidden_size"]), int(cfg["num_masks"]))
        try:
            heads.load_state_dict({k: v.float() for k, v in tensors.items()})
        except RuntimeError as e:
            raise ValueError(f"the parallelspec weights do not match their config ({e})") from e
        return heads.eval()

    def adapt(self, h: torch.Tensor) -> torch.Tensor:
        """h (R, H): row 0 the pending token's state (unchanged), row i the state of mask i (its block)."""
        if h.shape[0] == 1:
            return h
        rows = [h[:1]] + [self.blocks[i](h[i + 1: i + 2].float()).to(h.dtype) for i in range(h.shape[0] - 1)]
        return torch.cat(rows)  # (R, H)


class MaskEmbedding(nn.Module):
    """The drafter's token embedding plus the mask rows: ids >= `first` are masks (first + i = mask i)."""

    def __init__(self, base: nn.Module, masks: torch.Tensor, first: int):
        super().__init__()
        self.base, self.masks, self.first = base, masks, first

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        is_mask = flat >= self.first
        if not bool(is_mask.any()):
            return self.base(ids)
        real = self.base(flat[~is_mask])  # (n_real, H)
        out = real.new_empty(flat.shape[0], self.masks.shape[1])  # (N, H)
        out[~is_mask] = real
        out[is_mask] = self.masks[flat[is_mask] - self.first].to(out.dtype)
        return out.view(*ids.shape, -1)


class MaskedHead(nn.Module):
    """The CachedLM output layer during drafting: the mask blocks on rows 1.., then the drafter's own head."""

    def __init__(self, heads: MaskHeads, base: nn.Module):
        super().__init__()
        self.heads, self.base = heads, base

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.base(self.heads.adapt(h))  # (R, V)


class ParallelSpecDrafter(ModelDrafter):
    """One drafter forward per round: the pending token and k − 1 mask tokens give k draft distributions."""

    name = KIND

    def __init__(self, model: nn.Module, heads: MaskHeads, vocab_size: int, stop_ids: frozenset[int] = frozenset(),
                 head: nn.Module | None = None, tuned: list[dict[str, torch.Tensor]] | None = None):
        base = head if head is not None else model.get_output_embeddings()
        self.heads = heads.eval()
        self.lm = CachedLM(model, vocab_size, head=MaskedHead(self.heads, base), lean=True)
        dec = self.lm.lean
        if dec is None or not hasattr(dec, "embed"):
            raise ValueError("parallelspec needs a draft model verispec runs with its own decoder (Qwen2 / Llama "
                             "families on the gguf, fast or torch backends)")
        emb = model.get_input_embeddings()
        if emb.embedding_dim != heads.hidden:
            raise ValueError(f"the parallelspec masks are {heads.hidden} wide but the draft model's embeddings are "
                             f"{emb.embedding_dim}: they were trained for another draft model")
        first = int(emb.num_embeddings)
        dec.embed = MaskEmbedding(dec.embed, self.heads.masks.detach(), first)  # this drafter's decoder only
        if tuned:  # the last layers replaced in this drafter's decoder only (the model object is shared)
            n = len(dec.layers) - len(tuned)
            if n < 0:
                raise ValueError(f"{len(tuned)} tuned layers for a draft model of {len(dec.layers)}")
            dec.layers = list(dec.layers[:n]) + [tuned_layer(dec.layers[n + j], st, model)
                                                 for j, st in enumerate(tuned)]
            if hasattr(dec, "blocks"):  # the lean decoder's per-layer bundles
                from verispec.rewrites.lean import block

                dec.blocks = [block(layer) for layer in dec.layers]
        self.mask_ids = [first + i for i in range(heads.n_masks)]
        self.stop_ids = stop_ids

    @classmethod
    def from_ctx(cls, ctx) -> "ParallelSpecDrafter":
        from verispec.drafters.draft_model import head_for

        opts = dict(ctx.options)
        source = opts.pop("heads", None)
        vocab = {k: opts.pop(k) for k in ("draft_vocab", "vocab_corpus") if k in opts}
        if opts:
            raise ValueError(f"unknown parallelspec option(s): {', '.join(opts)}")
        heads, tuned = load_masks(source, ctx)
        return cls(ctx.drafter.model, heads, ctx.target.vocab_size, ctx.stop_ids, head=head_for(ctx, **vocab),
                   tuned=tuned)

    @property
    def max_drafts(self) -> int:
        return self.heads.n_masks + 1

    def propose(self, tokens, gamma, policy, sampling, generator) -> Draft:
        k = min(gamma, self.max_drafts)
        if k < 1:
            return Draft([], None, self.name)
        logits = self.lm.forward(list(tokens) + self.mask_ids[: k - 1], n_logits=k)  # (k, V): one forward
        q = sampling.probs(logits)  # (k, V): row i the law draft i is drawn from

        def steps():
            for i in range(k):
                yield sample(q[i], generator), q[i], logits[i]

        x, qs = bounded_chain(steps(), k, policy, self.stop_ids)
        return Draft(x, torch.stack(qs) if qs else None, self.name)  # q: (K, V)


def load_masks(source, ctx) -> tuple[MaskHeads, list[dict[str, torch.Tensor]]]:
    """(masks, tuned layers' tensors) from an in-memory MaskHeads (or a (MaskHeads, tuned) pair), a drafter folder
    path or name, or (None) the folder `verispec train parallelspec` writes for this target; refused for another
    target or another draft model."""
    from verispec.drafters.folder import default_name, load_drafter

    if isinstance(source, MaskHeads):
        return source, []
    if isinstance(source, tuple):
        return source
    if ctx.drafter is None:
        raise ValueError("parallelspec needs its draft model (drafter=...)")
    cfg, tensors, path = load_drafter(source or default_name(KIND, ctx.target.name), KIND, ctx.target.model)
    want = cfg.get("drafter", {})
    have = ctx.drafter.model.config
    if want.get("hidden_size") != have.hidden_size or want.get("num_layers") != have.num_hidden_layers:
        raise ValueError(f"{path} was trained for draft model {want.get('name')!r} ({want.get('num_layers')} layers "
                         f"x {want.get('hidden_size')}); this draft model is {have.num_hidden_layers} x "
                         f"{have.hidden_size}")
    L = int(cfg.get("tuned_layers", 0))
    tuned = [{k[len(f"layers.{j}."):]: v for k, v in tensors.items() if k.startswith(f"layers.{j}.")}
             for j in range(L)]
    if any(not t for t in tuned):
        raise ValueError(f"{path} lists {L} tuned layers but lacks the tensors of some")
    return MaskHeads.from_tensors(cfg, {k: v for k, v in tensors.items() if not k.startswith("layers.")}), tuned


def tuned_layer(like: nn.Module, state: dict[str, torch.Tensor], model: nn.Module) -> nn.Module:
    """A decoder layer like `like` (one of `model`'s, on its backend) with the tuned weights `state` (a torch
    layer's state_dict): on the gguf backend its linears become Q8_0 blocks of those weights; on another backend a
    fresh fp32 layer loads them and is put on that backend (fast-int4: int4 blocks of the tuned weights). `like`
    itself is not changed."""
    import copy

    from verispec.backends import apply_backend, backend_of
    from verispec.backends.native import NativeLinear, NativeMLP, NativeRMSNorm, is_native

    eps = float(model.config.rms_norm_eps)
    if not is_native(like):
        layer = type(like)(model.config, getattr(like.self_attn, "layer_idx", 0))
        try:
            layer.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"the tuned layer does not fit the draft model's layers ({e})") from e
        backend = backend_of(model)
        if backend != "torch":
            layer.config = model.config  # read by the backend's fusion of q/k/v and gate/up
            apply_backend(layer, backend, release_mapped=False)
        return layer.eval()
    from verispec.kernels.ggml_blocks import decode, quantize

    def lin(name: str) -> NativeLinear:
        w = state[f"{name}.weight"].float()  # (N, K)
        return NativeLinear(decode("Q8_0", quantize(w, "Q8_0"), w.shape[1]), state.get(f"{name}.bias"))

    layer = copy.copy(like)
    layer._modules = dict(like._modules)
    layer.__dict__.pop("_vs_fused", None)  # the fused projections of `like`: built again for these
    attn = copy.copy(like.self_attn)
    attn._modules = dict(like.self_attn._modules)
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
        attn._modules[n] = lin(f"self_attn.{n}")
    layer._modules["self_attn"] = attn
    layer._modules["mlp"] = NativeMLP(lin("mlp.gate_proj"), lin("mlp.up_proj"), lin("mlp.down_proj"))
    for n in ("input_layernorm", "post_attention_layernorm"):
        layer._modules[n] = NativeRMSNorm(state[f"{n}.weight"], eps)
    return layer


# -- training ---------------------------------------------------------------------------------------------------

def window_batch(seqs: list[np.ndarray], picks: list[tuple[int, int]], width: int, n_masks: int,
                 anchors: int, rng: np.random.Generator, prompts: list[int] | None = None):
    """Inputs for one step: B windows of `width` tokens, each followed by `anchors` groups of n_masks mask slots.

    Returns (ids (B, W), anchor positions (B, A), labels (B, A, M), own (B, W - 1)): mask i of anchor a predicts
    window[a + i + 1] (the token i + 1 places after the one at a, which row a itself predicts as next); own[b, t]
    is True where window token t + 1 is the target's own (past its sequence's prompt of prompts[s] tokens; all
    True without prompts)."""
    ids, where, labels, own = [], [], [], []
    for s, at in picks:
        P = 0 if prompts is None else prompts[s]
        own.append(np.arange(at + 1, at + width) >= P)
        w = np.asarray(seqs[s][at: at + width], dtype=np.int64)
        a = np.sort(rng.choice(np.arange(4, width - n_masks - 1), size=anchors, replace=False))  # (A,)
        ids.append(w)
        where.append(a)
        labels.append(np.stack([w[a + i + 1] for i in range(1, n_masks + 1)], 1))  # (A, M)
    return (torch.from_numpy(np.stack(ids)), torch.from_numpy(np.stack(where)),
            torch.from_numpy(np.stack(labels)), torch.from_numpy(np.stack(own)))


def layout(width: int, where: torch.Tensor, n_masks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(allowed (B, Q, Q) bool, positions (B, Q)) for a window followed by its mask groups, Q = W + A·M: window
    rows are causal; mask i of anchor a sits at position a + i and sees window[: a + 1] and masks 1..i of a."""
    B, A = where.shape
    M = n_masks
    Q = width + A * M
    allowed = torch.zeros(B, Q, Q, dtype=torch.bool)
    allowed[:, :width, :width] = torch.ones(width, width, dtype=torch.bool).tril()
    pos = torch.zeros(B, Q, dtype=torch.long)
    pos[:, :width] = torch.arange(width)
    for b in range(B):
        for j in range(A):
            a = int(where[b, j])
            g = width + j * M
            allowed[b, g: g + M, : a + 1] = True
            allowed[b, g: g + M, g: g + M] = torch.ones(M, M, dtype=torch.bool).tril()
            pos[b, g: g + M] = torch.arange(a + 1, a + 1 + M)
    return allowed, pos


def mask_logits(model: nn.Module, heads: MaskHeads, ids: torch.Tensor, where: torch.Tensor,
                teacher: bool = False):
    """The drafter's logits at every mask slot of the batch: (B, A, M, V). Gradients reach the mask embeddings
    (through every layer), the residual blocks and any drafter layer left trainable. teacher=True also returns the
    drafter's logits at every real position, (B, W, V) (row a + i: what it predicts there knowing the tokens in
    between, the distillation target of mask i of anchor a; the same forward)."""
    B, W = ids.shape
    A, M = where.shape[1], heads.n_masks
    allowed, pos = layout(W, where, M)
    emb = model.get_input_embeddings()(ids)  # (B, W, H)
    x = torch.cat([emb, heads.masks.to(emb.dtype)[None, None].expand(B, A, M, -1).reshape(B, A * M, -1)], 1)
    mask = torch.zeros(B, 1, *allowed.shape[1:], dtype=x.dtype)  # (B, 1, Q, Q) additive
    mask.masked_fill_(~allowed[:, None], torch.finfo(x.dtype).min)
    h = model.get_decoder()(inputs_embeds=x, attention_mask=mask, position_ids=pos).last_hidden_state  # (B, Q, H)
    out = model.get_output_embeddings()
    hm = h[:, W:].reshape(B, A, M, -1)  # (B, A, M, H)
    hm = torch.stack([heads.blocks[i](hm[:, :, i]) for i in range(M)], 2)  # (B, A, M, H)
    logits = out(hm)  # (B, A, M, V)
    if not teacher:
        return logits
    return logits, out(h[:, :W])  # (B, A, M, V), (B, W, V)


def teacher_rows(real: torch.Tensor, where: torch.Tensor, n_masks: int) -> torch.Tensor:
    """(B, A, M, V) rows a + i (i = 1..M) of the real-position logits (B, W, V), detached."""
    B, A = where.shape
    at = (where[:, :, None] + torch.arange(1, n_masks + 1)).reshape(B, -1)  # (B, A·M)
    rows = torch.gather(real.detach(), 1, at[:, :, None].expand(-1, -1, real.shape[-1]))  # (B, A·M, V)
    return rows.reshape(B, A, n_masks, -1)


def mask_loss(heads: MaskHeads, model: nn.Module, ids, where, labels, distill: float = 0.0,
              real_ce: float = 0.0, own: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy on the target's tokens ahead, mixed (weight `distill`) with KL from the drafter's own
    distribution at the real position (the law the mask should reproduce without the tokens in between); plus
    `real_ce` x the real rows' next-token cross-entropy where the next token is the target's own (`own`, (B, W - 1);
    when drafter layers are trained, so its first draft follows the target's text too)."""
    if distill <= 0 and real_ce <= 0:
        logits = mask_logits(model, heads, ids, where)  # (B, A, M, V)
        return nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
    logits, real = mask_logits(model, heads, ids, where, teacher=True)  # (B, A, M, V), (B, W, V)
    logp = logits.float().reshape(-1, logits.shape[-1]).log_softmax(-1)
    loss = (1 - distill) * nn.functional.nll_loss(logp, labels.reshape(-1))
    if distill > 0:
        teach = teacher_rows(real, where, heads.n_masks).float().reshape(-1, real.shape[-1]).log_softmax(-1)
        loss = loss + distill * nn.functional.kl_div(logp, teach, log_target=True, reduction="batchmean")
    if real_ce > 0:
        keep = torch.ones_like(ids[:, 1:], dtype=torch.bool) if own is None else own  # (B, W - 1)
        if bool(keep.any()):
            loss = loss + real_ce * nn.functional.cross_entropy(real[:, :-1][keep].float(), ids[:, 1:][keep])
    return loss


class _Trainable(nn.Module):
    """The training loop's model: the heads and the drafter's tuned last layers (trained, saved in checkpoints)
    beside the drafter (not a submodule: its frozen weights are not saved)."""

    def __init__(self, heads: MaskHeads, drafter: nn.Module, layers: list[nn.Module]):
        super().__init__()
        self.heads = heads
        self.layers = nn.ModuleList(layers)
        self.__dict__["drafter"] = drafter


def fit(drafter: nn.Module, seqs: list[np.ndarray], *, n_masks: int = 4, width: int = 96, anchors: int = 16,
        batch: int = 2, steps: int = 400, lr: float = 1e-3, mask_lr: float = 10.0, distill: float = 0.5,
        train_layers: int = 0, layer_lr: float = 0.1, prompts: list[int] | None = None,
        minutes: float | None = None, tokens: int | None = None, seed: int = 0, workdir=None,
        progress: bool = True) -> tuple[MaskHeads, object]:
    """Train MaskHeads on token sequences for `drafter` (a transformers causal LM, fp32: bf16 autocast was slower
    here, 2.7 against 2.0 s a step on the 0.5B), and its last `train_layers` decoder layers in place (at
    lr x layer_lr; every other weight frozen). prompts[s]: how many leading tokens of seqs[s] are prompt, not the
    target's (the real rows learn the target's tokens only). Returns (heads, report)."""
    from verispec.training import train

    keep = [i for i, s in enumerate(seqs) if len(s) >= width]
    prompts = None if prompts is None else [prompts[i] for i in keep]
    seqs = [np.asarray(seqs[i]) for i in keep]
    if not seqs:
        raise ValueError(f"no training sequence is {width} tokens long")
    if width < n_masks + 6 + anchors:
        raise ValueError(f"windows of {width} tokens cannot hold {anchors} anchors of {n_masks} masks")
    for p in drafter.parameters():
        p.requires_grad_(False)
    check_int("train_layers", train_layers, 0)
    body = list(drafter.get_decoder().layers)
    layers = body[len(body) - train_layers:] if train_layers else []
    for p in (p for layer in layers for p in layer.parameters()):
        p.requires_grad_(True)
        p.lr_scale = layer_lr
    emb = drafter.get_input_embeddings().weight
    torch.manual_seed(seed)
    heads = MaskHeads(emb.shape[1], n_masks, init=emb.detach().float().mean(0))
    heads.masks.lr_scale = mask_lr  # input embeddings move slowly under the blocks' rate (prompt tuning's lesson)
    from verispec.cache import MASK_AWARE

    if drafter.config._attn_implementation not in MASK_AWARE:
        drafter.set_attn_implementation("sdpa")  # the mask groups need a kernel that reads a custom 4D mask

    def batch_fn(step: int):
        rng = np.random.default_rng([seed, step])  # a pure function of the step: resumable
        picks = [(int(s), int(rng.integers(0, len(seqs[s]) - width + 1))) for s in rng.integers(0, len(seqs), batch)]
        ids, where, labels, own = window_batch(seqs, picks, width, n_masks, anchors, rng, prompts)
        return ids.numel(), ids, where, labels, own

    def loss_fn(m: _Trainable, ids, where, labels, own):
        return mask_loss(m.heads, m.drafter, ids, where, labels, distill, 1.0 if layers else 0.0, own)

    model = _Trainable(heads, drafter, layers)
    report = train(model, batch_fn, loss_fn, steps=steps, lr=lr, workdir=workdir, minutes=minutes, tokens=tokens,
                   warmup=10, progress=progress, label=KIND, checkpoint_every=25)
    return heads.eval(), report


@torch.no_grad()
def held_out_accuracy(drafter: nn.Module, heads: MaskHeads, seqs: list[np.ndarray], width: int = 96,
                      anchors: int = 16, n: int = 8, seed: int = 1) -> list[float]:
    """Top-1 accuracy of the drafter's next token (offset 1) and of each mask (offsets 2..M+1) on `n` windows."""
    seqs = [np.asarray(s) for s in seqs if len(s) >= width]
    rng = np.random.default_rng(seed)
    picks = [(int(s), int(rng.integers(0, len(seqs[s]) - width + 1))) for s in rng.integers(0, len(seqs), n)]
    ids, where, labels, _ = window_batch(seqs, picks, width, heads.n_masks, anchors, rng)
    pred = mask_logits(drafter, heads, ids, where).argmax(-1)  # (B, A, M)
    nxt = drafter(input_ids=ids).logits.argmax(-1)  # (B, W)
    first = torch.gather(nxt, 1, where) == torch.gather(ids, 1, where + 1)  # (B, A)
    return [float(first.float().mean())] + [float(v) for v in (pred == labels).float().mean((0, 1))]


def train_heads(target, store, out: str | Path | None = None, *, drafter="qwen2.5-coder-0.5b", n_heads: int = 5,
                steps: int = 400, batch: int = 2, lr: float = 1e-3, train_layers: int = 0,
                minutes: float | None = None,
                tokens: int | None = None, workdir=None, progress: bool = True, draft_vocab=None, seed: int = 0
                ) -> dict:
    """`verispec train parallelspec`: masks for k = n_heads drafts per forward (n_heads − 1 masks) of `drafter`,
    trained on the target's completions in `store`; writes a drafter folder to `out`. Returns a summary."""
    import time

    from verispec.distill import load_sequences, open_store_for
    from verispec.drafters.folder import save_drafter
    from verispec.models.load import load_model

    check_int("heads", n_heads, 2)
    target, info, fp = open_store_for(target, store)
    seqs = [np.asarray(t) for t, _ in load_sequences(info)]
    prompts = [int(sh.get("prompt", 0)) for sh in info.shards]
    d = load_model(drafter, backend="torch")  # trained through the dequantized weights; drafting runs any backend
    t0 = time.perf_counter()
    width = min(96, max(len(s) for s in seqs))  # shorter windows only for a store of short sequences
    anchors = min(16, width - n_heads - 5)
    if anchors < 1:
        raise ValueError(f"the store's sequences ({width} tokens at most) are too short for {n_heads} drafts")
    shape = dict(n_masks=n_heads - 1, width=width, anchors=anchors)
    n_train = max(1, len(seqs) - 8)
    heads, report = fit(d.model, seqs[:n_train], **shape, steps=steps, batch=batch, lr=lr,
                        train_layers=train_layers, prompts=prompts[:n_train], minutes=minutes, tokens=tokens, seed=seed, workdir=workdir,
                        progress=progress)
    acc = held_out_accuracy(d.model, heads, seqs[-8:] if len(seqs) > 8 else seqs, width, anchors)
    cfg = d.model.config
    summary = {"kind": KIND, "drafter": d.name, "drafts_per_forward": n_heads, "tuned_layers": train_layers,
               "steps": report.steps,
               "tokens": report.tokens, "minutes": round(report.seconds / 60, 2), "stopped_by": report.stopped_by,
               "final_loss": round(float(np.mean(report.losses[-20:])), 4) if report.losses else None,
               "held_out_top1_by_offset": [round(a, 3) for a in acc], "store_tokens": info.tokens,
               "train_seconds": round(time.perf_counter() - t0, 1)}
    if out is not None:
        config = {**heads.config(), "tuned_layers": train_layers,
                  "drafter": {"name": d.name, "hidden_size": cfg.hidden_size, "num_layers": cfg.num_hidden_layers},
                  "training": {k: summary[k] for k in ("steps", "tokens", "minutes", "held_out_top1_by_offset")}}
        body = list(d.model.get_decoder().layers)
        tensors = {**heads.state_dict(), **{f"layers.{j}.{k}": v for j, layer in
                                            enumerate(body[len(body) - train_layers:] if train_layers else [])
                                            for k, v in layer.state_dict().items()}}
        summary["folder"] = str(save_drafter(out, KIND, config, tensors, target.name, fp))
    return summary
