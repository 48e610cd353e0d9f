"""Medusa-1 heads: K extra decoding heads on the target's last hidden state, drafted as a token tree.

Cai et al. 2024, "Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding Heads". Head k
(k = 1..K) is a residual block x + SiLU(W_k x) (W_k zero-initialised, so an untrained head starts as the identity)
on the target's final hidden state h_t, read through the target's own frozen output layer: it predicts token
t + k + 1, while the target's output layer at h_t gives t + 1 (the pending token, already committed). Medusa-1
freezes the backbone and trains the heads alone (per-head cross-entropy, weights 0.8^k).

On CPU a full-vocabulary head per position costs nearly as much as the target's own output layer (151,936 x 1,536
MACs each), so heads read a reduced draft vocabulary: the target output layer's rows of the `draft_vocab` most
frequent tokens of the training data (tokens outside it are never drafted; drafts are deterministic, so the
verifier's one-hot rule keeps the target's law whatever the heads propose).

Candidates form a token tree declared as Medusa's `medusa_choices`: a list of paths, each a tuple of top-k ranks,
one per head (`(0, 1)` = head 1's best token, then head 2's second best). `compile_tree` turns it once into parents,
depths, the head and rank of each node, the attention mask (each node sees itself and its ancestors) and the
retrieve indices (every root-to-leaf path). Training measures each head's top-r accuracy on held-out rows and
`sparse_tree` picks the paths with the highest product of accuracies (Medusa's sparse-tree construction).

`verispec train medusa --target NAME` writes a drafter folder (`verispec.drafters.folder`); the method `medusa`
loads it (option `heads=PATH|NAME`, default the one trained for this target).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from verispec.drafters.base import Drafter, bounded_chain
from verispec.types import Draft
from verispec.validate import check_int

KIND = "medusa"


class ResBlock(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)  # the head starts as the identity: the target's own next-token head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """A linear layer's (N, K) weight as a plain tensor, whatever backend packed it (oneDNN, GGUF blocks)."""
    w = linear.dense_weight() if hasattr(linear, "dense_weight") else linear.weight
    return w.to_dense() if getattr(w, "is_mkldnn", False) else w


class OutputRows(nn.Module):
    """The target's output layer, frozen, restricted to `vocab_ids`. With the whole vocabulary at inference it is
    the target's own module (its packed kernel); otherwise dense rows (differentiable in x, for training)."""

    def __init__(self, target: nn.Module, vocab_ids: torch.Tensor | None, dense: bool = False):
        super().__init__()
        head = target.get_output_embeddings()
        self.q: nn.Module | None = None  # an int4 copy of the rows (`quantize`), for drafting only
        self.full = head if vocab_ids is None and not dense else None
        if self.full is None:
            with torch.no_grad():
                w = dense_weight(head)  # (V, H); a packed layer dequantizes it here, once
                rows = w if vocab_ids is None else w[vocab_ids]
                self.register_buffer("weight", rows.float().clone(), persistent=False)  # (Vd, H)
                b = getattr(head, "bias", None)
                b = None if b is None else (b if vocab_ids is None else b[vocab_ids]).float().clone()
                self.register_buffer("bias", b, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.full is not None:
            return self.full(x)  # (N, V)
        if self.q is not None:
            return self.q(x)  # (N, Vd)
        return F.linear(x, self.weight, self.bias)  # (N, Vd)

    def quantize(self) -> bool:
        """Draft through int4 rows (~1/6 of the bytes read per round); False where the kernel is unavailable."""
        if self.full is not None:
            return False
        from verispec.kernels.int4 import Int4Linear

        lin = nn.Linear(self.weight.shape[1], self.weight.shape[0], bias=self.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        self.q = Int4Linear.from_linear(lin)
        return self.q is not None


class MedusaHeads(nn.Module):
    """K residual heads over a hidden state; `bind(target)` attaches the target's (restricted) output layer."""

    def __init__(self, hidden: int, n_heads: int = 4, n_layers: int = 1, vocab_ids: torch.Tensor | None = None):
        super().__init__()
        self.hidden, self.n_heads, self.n_layers = hidden, n_heads, n_layers
        self.heads = nn.ModuleList(nn.Sequential(*[ResBlock(hidden) for _ in range(n_layers)])
                                   for _ in range(n_heads))
        self.register_buffer("vocab_ids", None if vocab_ids is None else vocab_ids.long())  # (Vd,) target ids
        self.out: OutputRows | None = None

    def bind(self, target: nn.Module, dense: bool = False) -> "MedusaHeads":
        """Attach the target's output layer (dense=True: as differentiable dense rows, for training)."""
        if target.config.hidden_size != self.hidden:
            raise ValueError(f"these heads read {self.hidden}-wide hidden states; the target's are "
                             f"{target.config.hidden_size}")
        object.__setattr__(self, "out", OutputRows(target, self.vocab_ids, dense))  # not a submodule: never saved
        for p in self.out.parameters():
            p.requires_grad_(False)
        return self

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (N, H) -> logits (K, N, Vd) over the draft vocabulary."""
        z = torch.stack([head(h) for head in self.heads])  # (K, N, H)
        # one product for all heads: the output rows (Vd x H, ~100 MB at 16k x 1536 fp32) are read once per round,
        # not once per head — on CPU that read, not the arithmetic, is the head's cost
        return self.out(z.reshape(-1, self.hidden)).reshape(z.shape[0], z.shape[1], -1)  # (K, N, Vd)

    def to_target_ids(self, idx: torch.Tensor) -> torch.Tensor:
        return idx if self.vocab_ids is None else self.vocab_ids[idx]

    def config(self) -> dict:
        return {"hidden_size": self.hidden, "num_heads": self.n_heads, "num_layers": self.n_layers,
                "draft_vocab_size": None if self.vocab_ids is None else int(self.vocab_ids.numel())}

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {k: v for k, v in self.state_dict().items() if k != "vocab_ids"}
        if self.vocab_ids is not None:
            t["vocab_ids"] = self.vocab_ids
        return t

    @classmethod
    def from_config(cls, cfg: dict, vocab_ids: torch.Tensor | None) -> "MedusaHeads":
        return cls(int(cfg["hidden_size"]), int(cfg["num_heads"]), int(cfg["num_layers"]), vocab_ids)

    @classmethod
    def from_tensors(cls, cfg: dict, tensors: dict[str, torch.Tensor]) -> "MedusaHeads":
        heads = cls.from_config(cfg, tensors.get("vocab_ids"))
        missing, unexpected = heads.load_state_dict({k: v for k, v in tensors.items() if k != "vocab_ids"},
                                                    strict=False)
        if [m for m in missing if m != "vocab_ids"] or unexpected:
            raise ValueError(f"the {cls.__name__} weights do not match their config (missing {missing}, unexpected "
                             f"{unexpected})")
        return heads


# -- token trees ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TreePlan:
    """A compiled `medusa_choices`: node i is paths[i]; parents[i] (-1 = the pending token); depth[i] (1-based: head
    depth - 1 drafts it); rank[i] (its top-k rank in that head); mask (n, n) bool, True where node i may attend to
    node j (itself and its ancestors); retrieve: the node indices of every root-to-leaf path."""

    paths: tuple[tuple[int, ...], ...]
    parents: tuple[int, ...]
    depth: tuple[int, ...]
    rank: tuple[int, ...]
    mask: torch.Tensor
    retrieve: tuple[tuple[int, ...], ...]

    def upto(self, d: int) -> list[int]:
        """The nodes at depth <= d (a connected subtree: parents come first)."""
        return [i for i, x in enumerate(self.depth) if x <= d]


def compile_tree(choices) -> TreePlan:
    """Medusa choices (a list of rank paths) -> TreePlan. Paths are sorted by length then ranks; every prefix of a
    path must be a path too (the tree is connected)."""
    paths = sorted({tuple(int(r) for r in c) for c in choices}, key=lambda p: (len(p), p))
    if not paths or any(len(p) == 0 or min(p) < 0 for p in paths):
        raise ValueError("medusa choices must be non-empty paths of ranks >= 0, e.g. [(0,), (1,), (0, 0)]")
    index = {p: i for i, p in enumerate(paths)}
    parents = []
    for p in paths:
        if len(p) > 1 and p[:-1] not in index:
            raise ValueError(f"medusa choice {p} has no parent {p[:-1]} among the choices")
        parents.append(index[p[:-1]] if len(p) > 1 else -1)
    n = len(paths)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parents[j]
    leaves = [i for i in range(n) if i not in set(parents)]
    retrieve = []
    for leaf in leaves:
        path, j = [], leaf
        while j >= 0:
            path.append(j)
            j = parents[j]
        retrieve.append(tuple(reversed(path)))
    return TreePlan(tuple(paths), tuple(parents), tuple(len(p) for p in paths), tuple(p[-1] for p in paths), mask,
                    tuple(retrieve))


def sparse_tree(acc: np.ndarray, nodes: int) -> list[tuple[int, ...]]:
    """The `nodes` paths of highest estimated acceptance, acc[k, r] = P(head k's rank-r token is right): a path's
    score is the product over its heads (Medusa's sparse tree). A prefix never scores below its path, so the best
    set is connected; it is grown best-first."""
    K, R = acc.shape
    import heapq

    heap = [(-float(acc[0, r]), (r,)) for r in range(R)]
    heapq.heapify(heap)
    out: list[tuple[int, ...]] = []
    while heap and len(out) < nodes:
        s, p = heapq.heappop(heap)
        out.append(p)
        if len(p) < K:
            for r in range(R):
                heapq.heappush(heap, (s * float(acc[len(p), r]), p + (r,)))
    return out


def parse_choices(text) -> list[tuple[int, ...]]:
    """'0;1;0.0;0.1' (paths joined by ';', ranks by '.') or a list of tuples."""
    if isinstance(text, str):
        try:
            return [tuple(int(r) for r in p.split(".")) for p in text.split(";") if p.strip()]
        except ValueError:
            raise ValueError(f"tree must be paths of ranks like '0;1;0.0;0.1', got {text!r}") from None
    return [tuple(int(r) for r in p) for p in text]


# -- the drafter ------------------------------------------------------------------------------------------------

class MedusaDrafter(Drafter):
    """Drafts a token tree (or, tree="chain", each head's top-1 as a chain) from the target's last hidden state."""

    name = KIND
    target_features = ("final",)

    def __init__(self, heads: MedusaHeads, tree: TreePlan | None, stop_ids: frozenset[int] = frozenset()):
        self.heads, self.tree, self.stop_ids = heads, tree, stop_ids
        self.h: torch.Tensor | None = None

    @classmethod
    def from_ctx(cls, ctx) -> "MedusaDrafter":
        opts = dict(ctx.options)
        source = opts.pop("heads", None)
        weights = opts.pop("weights", "auto")
        tree = opts.pop("tree", None)
        if opts:
            raise ValueError(f"unknown medusa option(s): {', '.join(opts)}")
        heads, cfg = prepared_heads(source, ctx, KIND, MedusaHeads, weights)
        if tree == "chain":
            plan = None
        elif tree is None:
            plan = compile_tree(cfg.get("tree") or sparse_tree(default_acc(heads.n_heads), 16))
        else:
            plan = compile_tree(parse_choices(tree))
        if plan is not None and max(plan.depth) > heads.n_heads:
            raise ValueError(f"the tree is {max(plan.depth)} deep but there are only {heads.n_heads} heads")
        return cls(heads, plan, ctx.stop_ids)

    def take_features(self, features):
        self.h = features[-1].clone() if len(features) else None  # (H,) after tokens[:-1]: heads draft past tokens[-1]

    @torch.inference_mode()
    def propose(self, tokens, gamma, policy, sampling, generator) -> Draft:
        if self.h is None or gamma < 1:
            return Draft([], None, self.name)
        depth = min(gamma, self.heads.n_heads)
        self.forwards += 1
        logits = self.heads(self.h[None].float())[:depth, 0]  # (depth, Vd)
        if self.tree is None:
            top = self.heads.to_target_ids(logits.argmax(-1)).tolist()
            steps = ((t, None, logits[i]) for i, t in enumerate(top))
            x, _ = bounded_chain(steps, depth, policy, self.stop_ids)
            return Draft(x, None, self.name)
        keep = self.tree.upto(depth)
        R = 1 + max(self.tree.rank[i] for i in keep)
        top = self.heads.to_target_ids(logits.topk(min(R, logits.shape[-1]), dim=-1).indices)  # (depth, R)
        where = {old: new for new, old in enumerate(keep)}
        toks, parents = [], []
        for i in keep:
            if self.tree.rank[i] >= top.shape[1]:
                continue  # a draft vocabulary smaller than the tree's widest rank
            toks.append(int(top[self.tree.depth[i] - 1, self.tree.rank[i]]))
            parents.append(-1 if self.tree.parents[i] < 0 else where[self.tree.parents[i]])
        return Draft(toks, None, self.name, parents=parents)


WEIGHTS = ("auto", "int4", "fp32")


def draft_weights(heads, weights: str, source, target: nn.Module):
    """weights="int4": the heads' linears and output rows on the int4 kernel (drafting reads ~1/6 of the bytes;
    the drafts change, the verified output does not); "fp32": as trained; "auto": int4 for heads loaded from a
    folder (ours to change), as given for an object passed in."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}; got {weights!r}")
    if weights == "int4" or (weights == "auto" and not isinstance(source, nn.Module)):
        from verispec.kernels.int4 import quantize_linears

        if isinstance(source, nn.Module):  # never change the caller's object: quantize a copy of its weights
            heads = type(heads).from_tensors(heads.config(), heads.tensors()).bind(target)
        quantize_linears(heads.heads)
        heads.out.quantize()
    return heads


def default_acc(k: int, r: int = 4) -> np.ndarray:
    """Rough per-head top-r accuracies (Medusa's paper: ~0.6 for head 1, falling by head and rank), used only when a
    drafter folder has no measured tree."""
    return np.array([[0.6 * 0.8 ** i * 0.45 ** j for j in range(r)] for i in range(k)])


def prepared_heads(source, ctx, kind: str, cls, weights: str):
    """(heads bound to the target and put on their drafting weights, config): a folder's heads are read, checked
    and quantized once per target (`folder.prepared`), an object passed in is used as `draft_weights` says."""
    from verispec.drafters.folder import prepared

    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}; got {weights!r}")

    def build():
        heads, cfg = load_heads(source, ctx.target, kind, cls)
        return draft_weights(heads.bind(ctx.target.model), weights, source, ctx.target.model), cfg

    return prepared(ctx.target, kind, source, (cls.__name__, weights), build)


def load_heads(source, target, kind: str, cls=MedusaHeads):
    """(heads, config) from an in-memory head object, a drafter folder path or name, or (None) the default folder
    `verispec train` writes for this target."""
    from verispec.drafters.folder import default_name, load_drafter

    if isinstance(source, nn.Module):
        return source, {}
    if source is None:
        source = default_name(kind, target.name)
    cfg, tensors, _ = load_drafter(source, kind, target.model)
    return cls.from_tensors(cfg, tensors), cfg


# -- training ---------------------------------------------------------------------------------------------------

def draft_vocabulary(sequences, size: int | None, vocab: int) -> torch.Tensor | None:
    """The `size` most frequent target tokens of the training sequences (None: the whole vocabulary)."""
    if size is None or size >= vocab:
        return None
    counts = np.zeros(vocab, dtype=np.int64)
    for tokens, _ in sequences:
        np.add.at(counts, np.asarray(tokens, dtype=np.int64), 1)
    return torch.from_numpy(np.sort(np.argsort(-counts, kind="stable")[:size])).long()


def row_index(sequences) -> np.ndarray:
    """(n, 2) (sequence, row) pairs whose row has at least one label (row + 2 < T)."""
    return np.array([(s, i) for s, (t, _) in enumerate(sequences) for i in range(len(t) - 2)], dtype=np.int64)


def head_batch(sequences, rows: np.ndarray, n_heads: int, to_draft: torch.Tensor | None):
    """Features (B, H) and labels (B, K) in draft ids (-100 where none: past the end or outside the vocabulary):
    head k's label at row i is token i + k + 1."""
    feats = torch.from_numpy(np.stack([np.asarray(sequences[s][1][i], dtype=np.float32) for s, i in rows]))
    labels = torch.full((len(rows), n_heads), -100, dtype=torch.long)
    for b, (s, i) in enumerate(rows):
        t = sequences[s][0]
        for k in range(n_heads):
            j = i + k + 2
            if j < len(t):
                labels[b, k] = int(t[j])
    if to_draft is not None:
        ok = labels >= 0
        labels[ok] = to_draft[labels[ok]]
    return feats, labels


def inverse(vocab_ids: torch.Tensor | None, vocab: int) -> torch.Tensor | None:
    """target id -> draft id (-100 outside the draft vocabulary)."""
    if vocab_ids is None:
        return None
    inv = torch.full((vocab,), -100, dtype=torch.long)
    inv[vocab_ids] = torch.arange(len(vocab_ids))
    return inv


def medusa_loss(heads: MedusaHeads, feats: torch.Tensor, labels: torch.Tensor, decay: float = 0.8) -> torch.Tensor:
    logits = heads(feats)  # (K, B, Vd)
    total = feats.new_zeros(())
    for k in range(heads.n_heads):
        if (labels[:, k] >= 0).any():
            total = total + decay ** k * F.cross_entropy(logits[k], labels[:, k], ignore_index=-100)
    return total


@torch.no_grad()
def head_accuracy(heads: MedusaHeads, sequences, rows: np.ndarray, to_draft, ranks: int = 4) -> np.ndarray:
    """acc[k, r]: share of held-out rows where head k's rank-r token is the label."""
    feats, labels = head_batch(sequences, rows, heads.n_heads, to_draft)
    top = heads(feats).topk(ranks, dim=-1).indices  # (K, B, R)
    acc = np.zeros((heads.n_heads, ranks))
    for k in range(heads.n_heads):
        ok = labels[:, k] >= 0
        if ok.any():
            hit = top[k][ok] == labels[ok, k, None]  # (b, R)
            acc[k] = hit.float().mean(0).numpy()
    return acc


def train_heads(target, store, out: str | Path | None = None, *, heads_cls=MedusaHeads, kind: str = KIND,
                loss=medusa_loss, n_heads: int = 4, n_layers: int = 1, draft_vocab: int | None = 16384,
                steps: int = 4000, batch: int = 64, lr: float = 1e-3, minutes: float | None = None,
                tokens: int | None = None, tree_nodes: int = 16, seed: int = 0, workdir: str | Path | None = None,
                progress: bool = True, head_options: dict | None = None) -> dict:
    """Train heads on a feature store (`verispec.distill`) of this target and write a drafter folder to `out`
    (None: only return). Returns a summary: steps, tokens, minutes, held-out accuracies, the tree, the folder."""
    from verispec.distill import load_sequences, open_store_for
    from verispec.drafters.folder import save_drafter
    from verispec.training import train

    target, info, fp = open_store_for(target, store)
    if "final" not in info.spec:
        raise ValueError(f"{kind} heads read the final hidden state; the store holds {info.spec}")
    check_int("steps", steps, 1)
    check_int("batch", batch, 1)
    H = target.model.config.hidden_size
    j = info.spec.index("final")  # one store serves every trained drafter: the final feature's columns
    sequences = [(t, f[:, j * H:(j + 1) * H]) for t, f in load_sequences(info)]
    V = target.vocab_size
    vocab_ids = draft_vocabulary(sequences, draft_vocab, V)
    to_draft = inverse(vocab_ids, V)
    rows = row_index(sequences)
    rng = np.random.default_rng(seed)
    rng.shuffle(rows)
    n_held = max(1, min(512, len(rows) // 10))
    held, train_rows = rows[:n_held], rows[n_held:]
    if len(train_rows) == 0:
        raise ValueError(f"the feature store {info.path} is too small to train on ({len(rows)} rows)")
    torch.manual_seed(seed)
    heads = heads_cls(target.model.config.hidden_size, n_heads, n_layers, vocab_ids, **(head_options or {}))
    heads.bind(target.model, dense=True)

    def make_batch(step: int):
        g = np.random.default_rng([seed, step])  # a pure function of the step: resumes reproduce the run
        pick = train_rows[g.integers(0, len(train_rows), batch)]
        feats, labels = head_batch(sequences, pick, n_heads, to_draft)
        return batch, feats, labels

    report = train(heads, make_batch, loss, steps=steps, lr=lr, workdir=workdir, minutes=minutes, tokens=tokens,
                   warmup=max(1, steps // 20), progress=progress, label=f"train {kind}")
    acc = head_accuracy(heads, sequences, held, to_draft)
    choices = sparse_tree(acc, tree_nodes)
    summary = {"steps": report.steps, "tokens": report.tokens, "minutes": round(report.seconds / 60, 2),
               "stopped_by": report.stopped_by, "resumed_from": report.resumed_from,
               "loss_first": report.losses[0] if report.losses else None,
               "loss_last": float(np.mean(report.losses[-20:])) if report.losses else None,
               "store_tokens": info.tokens, "held_out_rows": int(n_held),
               "top1_accuracy": [round(float(a), 4) for a in acc[:, 0]],
               "top4_accuracy": [round(float(a), 4) for a in acc.sum(1)], "tree": [list(p) for p in choices],
               # a planning estimate from held-out accuracies (independence assumed), not a measured result
               "planned_tokens_per_round": round(expected_tokens(acc, choices), 3)}
    if out is not None:
        cfg = {**heads.config(), "tree": [list(p) for p in choices], "training": summary,
               "recipe": {"steps": steps, "batch": batch, "lr": lr, "seed": seed}}
        summary["folder"] = str(save_drafter(out, kind, cfg, heads.tensors(), target.name, fp))
    summary["heads"] = heads
    return summary


def expected_tokens(acc: np.ndarray, choices) -> float:
    """Medusa's estimate of tokens per round of a tree: 1 + sum over nodes of the product of accuracies on its path
    (independence assumed; a planning number, never a reported result)."""
    return 1.0 + sum(math.prod(float(acc[d, r]) for d, r in enumerate(p)) for p in choices)
