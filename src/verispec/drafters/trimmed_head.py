"""A drafter output layer cut to the most frequent tokens, after Zhao et al. 2025, "FR-Spec: Accelerating
Large-Vocabulary Language Models via Frequency-Ranked Speculative Sampling".

Qwen2.5's vocabulary has 151,936 entries, so the 0.5B drafter's output layer is about a quarter of its weights
and a matching share of each draft forward. The drafter may compute logits for only the K most frequent tokens of
a corpus (the rest get −inf): it then drafts from a distribution q that is zero outside those K tokens. The draft
distribution only changes speed, never the output law: the verifier receives exactly the q each token was sampled
from, so speculative sampling stays lossless; greedy drafts are the argmax over the K tokens. Stop tokens are
always kept.

The trimmed layer's weights are read from the drafter's own output layer as it runs (probing it with the identity
matrix, so a packed or int8 layer gives its effective weights) and the new layer is put on the drafter's backend.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn


class TrimmedHead(nn.Module):
    """hidden (n, H) -> logits (n, V): a K-row linear over `ids`, −inf for every other token."""

    def __init__(self, ids: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, vocab_size: int):
        super().__init__()
        self.register_buffer("ids", ids)  # (K,)
        self.linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)  # (K, H)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            if bias is not None:
                self.linear.bias.copy_(bias)
        self.vocab_size = vocab_size

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        sub = self.linear(h)  # (n, K)
        out = sub.new_full((h.shape[0], self.vocab_size), float("-inf"))  # (n, V)
        return out.index_copy_(1, self.ids, sub)


def token_counts(corpus, vocab_size: int) -> np.ndarray:
    """How often each token id occurs in a REST datastore (a `Datastore` or a .npz path). (V,)"""
    from verispec.datastore import SEP, Datastore

    ds = corpus if isinstance(corpus, Datastore) else Datastore.load(Path(corpus))
    T = ds.T[ds.T != SEP]
    if T.size and int(T.max()) >= vocab_size:
        raise ValueError(f"vocab_corpus has token id {int(T.max())} >= the vocabulary size {vocab_size}")
    return np.bincount(T, minlength=vocab_size)[:vocab_size]


def top_ids(counts: np.ndarray, k: int, always: frozenset[int] = frozenset()) -> torch.Tensor:
    """The k most frequent ids (ties: smaller id first), plus `always`, sorted. (k',)"""
    order = np.lexsort((np.arange(len(counts)), -counts))[:k]  # by count desc, then id asc
    return torch.tensor(sorted(set(order.tolist()) | set(always)), dtype=torch.long)


@torch.no_grad()
def trimmed_head(model: nn.Module, ids: torch.Tensor, vocab_size: int, backend: str) -> TrimmedHead:
    """A TrimmedHead over `ids` with the weights of `model`'s output layer, on `backend`."""
    from verispec.backends import apply_backend

    out = model.get_output_embeddings()
    H = model.get_input_embeddings().weight.shape[1]
    dtype = next(model.parameters()).dtype
    probe = getattr(out, "narrow", out)  # an int4 layer: its int4 weights, not the int8 copy wide inputs take
    bias = probe(torch.zeros(1, H, dtype=dtype))[0]  # (V,) the layer's bias (zeros when it has none)
    eye = torch.eye(H, dtype=dtype)  # (H, H)
    WT = probe(eye) - bias  # (H, V) effective weights, transposed
    ids_in = ids[ids < WT.shape[1]]
    w = WT[:, ids_in].T.contiguous().float()  # (K, H)
    b = bias[ids_in].float() if bool(bias.abs().max() > 0) else None
    head = TrimmedHead(ids_in, w, b, vocab_size)
    apply_backend(head, backend, release_mapped=False)
    return head
