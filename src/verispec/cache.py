"""A causal LM bound to its KV cache: the only place in verispec that edits a cache.

The cache always holds the KV entries of a prefix of the sequence this model has been asked about (`ids`).
Before every forward the cache is cropped to the longest prefix it shares with the requested sequence, so after
a rejection both models end exactly as if only the kept tokens had been fed (the rule that decides
losslessness of the KV state). Positions are explicit: the cache length is the position of the next token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache


def output_width(model: torch.nn.Module) -> int:
    """Rows of the output layer (any module with `out_features`, e.g. nn.Linear or a backend's packed linear)."""
    head = model.get_output_embeddings()
    return int(getattr(head, "out_features", None) or head.weight.shape[0])


class CachedLM:
    """One HF causal LM, batch size 1, plus a DynamicCache and forward/token counters."""

    def __init__(self, model: torch.nn.Module, vocab_size: int | None = None):
        self.model = model
        self.device = next(model.parameters()).device
        # Width of the distributions handed to the verifier: logits are padded (-inf) or cut to it, so a drafter
        # whose embedding table is padded differently from the target's still speaks the target's vocabulary.
        self.vocab_size = vocab_size or output_width(model)
        self.cache: DynamicCache | None = None
        self.ids: list[int] = []
        self.forwards = 0
        self.tokens_processed = 0

    def reset(self) -> None:
        self.cache = DynamicCache(config=self.model.config)
        self.ids = []
        self.forwards = 0
        self.tokens_processed = 0

    def rollback(self, tokens: Sequence[int], limit: int | None = None) -> int:
        """Crop the cache to the longest common prefix with `tokens` (at most `limit`); return its length."""
        n = min(len(self.ids), len(tokens) if limit is None else min(limit, len(tokens)))
        i = 0
        ids = self.ids
        while i < n and ids[i] == tokens[i]:
            i += 1
        if i < len(ids):
            self.cache.crop(i - len(ids))  # negative count = tokens to drop (transformers 5 API)
            del ids[i:]
        return i

    @torch.inference_mode()
    def forward(self, tokens: Sequence[int], n_logits: int = 1) -> torch.Tensor:
        """Logits for the last `n_logits` positions of `tokens`, feeding only what the cache lacks.

        Returns (n_logits, vocab_size) float logits; row j predicts the token after tokens[len - n_logits + j].
        """
        if self.cache is None:
            self.reset()
        if not 1 <= n_logits <= len(tokens):
            raise ValueError(f"n_logits={n_logits} must be in [1, {len(tokens)}]")
        keep = self.rollback(tokens, limit=len(tokens) - n_logits)  # positions we need logits for are re-fed
        new = list(tokens[keep:])
        input_ids = torch.tensor([new], dtype=torch.long, device=self.device)  # (1, T)
        out = self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True, logits_to_keep=n_logits)
        self.ids.extend(new)
        self.forwards += 1
        self.tokens_processed += len(new)
        return self._fit_vocab(out.logits[0])  # (n_logits, V)

    @torch.inference_mode()
    def prefill(self, tokens: Sequence[int]) -> None:
        """Fill the cache with `tokens` without computing any logits (the lm_head is the costliest layer)."""
        if self.cache is None:
            self.reset()
        keep = self.rollback(tokens)
        new = list(tokens[keep:])
        if not new:
            return
        input_ids = torch.tensor([new], dtype=torch.long, device=self.device)  # (1, T)
        body = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
        if body is not None:
            body(input_ids=input_ids, past_key_values=self.cache, use_cache=True)
        else:  # fall back to a full forward that keeps a single logit row
            self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.ids.extend(new)
        self.forwards += 1
        self.tokens_processed += len(new)

    def _fit_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        v = logits.shape[-1]
        if v == self.vocab_size:
            return logits
        if v > self.vocab_size:
            return logits[..., : self.vocab_size]
        pad = logits.new_full((*logits.shape[:-1], self.vocab_size - v), float("-inf"))
        return torch.cat([logits, pad], dim=-1)
