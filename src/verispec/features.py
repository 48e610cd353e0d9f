"""The target's hidden states for drafters that read them (Medusa, EAGLE, blockwise heads): one mechanism for all.

A drafter names the features it wants (`Drafter.target_features`): "final" is the final-norm hidden state (what
the target's output layer reads: Medusa's and EAGLE-1's feature), an integer i the *input* of decoder layer i (the
residual stream after layers 0..i-1: EAGLE-3 fuses the inputs of layers 2, L/2 and L-3, as vLLM numbers them).
`FeatureTap` records them with forward hooks, so every forward path (transformers' forward, the native decoder,
its ragged batch, token trees) reports them for every row it feeds, without a line of method-specific code there.

`CachedLM` keeps the rows in a buffer aligned with its KV cache (`CachedLM.features`): cropped, tree-settled and
extended exactly as the cache is, so after a round the drafter reads the features of every committed position but
the pending one. A position's features depend on its prefix only (they are the same numbers the target's own
logits come from), so reading them changes nothing the verifier sees.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

FINAL = "final"


def check_spec(spec: Sequence, n_layers: int) -> tuple:
    """The feature names, checked against a decoder of n_layers layers."""
    out = []
    for s in spec:
        if s == FINAL:
            out.append(FINAL)
            continue
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < n_layers:
            raise ValueError(f"target feature {s!r}: use {FINAL!r} or a layer index in [0, {n_layers})")
        out.append(int(s))
    if not out:
        raise ValueError("a feature tap needs at least one feature")
    return tuple(out)


class FeatureTap:
    """Forward hooks on a causal LM's decoder that keep, for the last forward, the rows of each named feature.

    `take()` returns the features of every row that forward fed, concatenated along the last dimension
    (rows, F) in the order of `spec`, and clears them. One tap per CachedLM; `close()` removes the hooks."""

    def __init__(self, model: nn.Module, spec: Sequence):
        body = model.get_decoder()
        layers = list(body.layers)
        self.spec = check_spec(spec, len(layers))
        self.width = model.config.hidden_size * len(self.spec)
        self._rows: list[torch.Tensor | None] = [None] * len(self.spec)
        self._handles = []
        for j, s in enumerate(self.spec):
            if s == FINAL:  # the final norm's output: every fed row (the native decoder norms them all)
                h = body.norm.register_forward_hook(lambda m, args, out, j=j: self._put(j, out))
            else:  # the residual stream entering layer s: the argument of its input norm, in every forward path
                h = layers[s].input_layernorm.register_forward_hook(lambda m, args, out, j=j: self._put(j, args[0]))
            self._handles.append(h)

    def _put(self, j: int, x: torch.Tensor) -> None:
        self._rows[j] = x.detach().reshape(-1, x.shape[-1]).float()  # (rows, H)

    def take(self) -> torch.Tensor:
        if any(r is None for r in self._rows):
            raise RuntimeError("the feature tap saw no forward: this decoder path does not call the hooked modules")
        out = torch.cat(self._rows, dim=-1) if len(self._rows) > 1 else self._rows[0]  # (rows, F)
        self._rows = [None] * len(self.spec)
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class FeatureBuffer:
    """Rows of features aligned with a KV cache: `n` valid rows in a buffer that grows by doubling."""

    def __init__(self, width: int):
        self.data = torch.empty(0, width)
        self.n = 0

    def view(self) -> torch.Tensor:
        return self.data[: self.n]  # (n, F)

    @torch.inference_mode()  # rows come from inference-mode forwards; edits happen in and out of them
    def append(self, rows: torch.Tensor) -> None:
        need = self.n + rows.shape[0]
        if need > self.data.shape[0]:
            grown = torch.empty(max(need, 2 * self.data.shape[0], 64), self.data.shape[1])
            grown[: self.n] = self.data[: self.n]
            self.data = grown
        self.data[self.n: need] = rows
        self.n = need

    def crop(self, n: int) -> None:
        self.n = min(self.n, n)

    @torch.inference_mode()
    def select(self, idx: torch.Tensor) -> None:
        """Keep rows idx (ascending), in order: a settled token tree keeps its committed path."""
        kept = self.data[idx]
        self.data[: len(idx)] = kept
        self.n = len(idx)
