"""Blockwise parallel decoding: k proposal heads on the target's last hidden state, drafted as one chain.

Stern, Shazeer & Uszkoreit 2018, "Blockwise Parallel Decoding for Deep Autoregressive Models" — the method seed of
the trained-head family. Head k (k = 1..K) is a feed-forward layer with a residual connection, x + W2 ReLU(W1 x)
(W2 zero-initialised: an untrained head is the identity), followed by the target's own frozen output layer (a
reduced draft vocabulary on CPU, as `verispec.drafters.medusa`); it predicts token t + k + 1. A round is the
paper's predict -> verify -> accept: the heads' top-1 tokens form a chain of up to k drafts, the target scores it
in one forward and the longest prefix it agrees with is kept (greedy), plus the target's own next token. Under
sampling the chain goes through the lossless rejection rule with one-hot drafts, which keeps the target's law.

`verispec train blockwise --target NAME` trains the heads (per-head cross-entropy, the same self-distillation data
and loop as Medusa); the method `blockwise` loads them (option `heads=PATH|NAME`).
"""

from __future__ import annotations

import torch
from torch import nn

from verispec.drafters import medusa
from verispec.drafters.medusa import MedusaDrafter, MedusaHeads, prepared_heads

KIND = "blockwise"


class FFNBlock(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.up, self.down = nn.Linear(hidden, inner), nn.Linear(inner, hidden)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class BlockwiseHeads(MedusaHeads):
    """k proposal heads, each one residual feed-forward layer (inner width = hidden by default)."""

    def __init__(self, hidden: int, n_heads: int = 4, n_layers: int = 1, vocab_ids: torch.Tensor | None = None,
                 inner: int | None = None):
        super().__init__(hidden, n_heads, n_layers, vocab_ids)
        self.inner = inner or hidden
        self.heads = nn.ModuleList(nn.Sequential(*[FFNBlock(hidden, self.inner) for _ in range(n_layers)])
                                   for _ in range(n_heads))

    def config(self) -> dict:
        return {**super().config(), "inner_size": self.inner}

    @classmethod
    def from_config(cls, cfg: dict, vocab_ids: torch.Tensor | None) -> "BlockwiseHeads":
        return cls(int(cfg["hidden_size"]), int(cfg["num_heads"]), int(cfg["num_layers"]), vocab_ids,
                   int(cfg.get("inner_size") or cfg["hidden_size"]))


class BlockwiseDrafter(MedusaDrafter):
    """The heads' top-1 tokens as one chain (the draft-length policy may stop it early)."""

    name = KIND

    @classmethod
    def from_ctx(cls, ctx) -> "BlockwiseDrafter":
        unknown = set(ctx.options) - {"heads", "weights"}
        if unknown:
            raise ValueError(f"unknown blockwise option(s): {', '.join(sorted(unknown))}")
        heads, _ = prepared_heads(ctx.options.get("heads"), ctx, KIND, BlockwiseHeads,
                                  ctx.options.get("weights", "auto"))
        return cls(heads, None, ctx.stop_ids)


def train_heads(target, store, out=None, **kw) -> dict:
    """`verispec.drafters.medusa.train_heads` with proposal heads (the tree it measures is unused: chains)."""
    return medusa.train_heads(target, store, out, heads_cls=BlockwiseHeads, kind=KIND, **kw)
