"""Speculative (rejection) sampling: Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding" (Algorithm 1); Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative Sampling".

For draft token x_i ~ q_i: keep it with probability min(1, p_i(x_i) / q_i(x_i)) using a fresh uniform draw; at the
first rejection sample the *recovered* token from norm(max(0, p_i - q_i)) and drop the rest; if all K drafts pass,
sample the *bonus* token from p_{K+1}. Greedy decoding needs no separate path: with one-hot p and q the rule accepts
exactly when the draft equals the target argmax, and the residual is the target argmax.
Token trees (`draft.parents` set) go to the tree rule in `verifiers/tree.py`.
"""

from __future__ import annotations

import torch

from verispec.sampling import sample
from verispec.types import Draft, VerifyResult
from verispec.verifiers.tree import verify_tree


class RejectionVerifier:
    name = "rejection"
    lossless = True

    def verify(self, draft: Draft, p: torch.Tensor, generator: torch.Generator | None) -> VerifyResult:
        """p: (K+1, V) target probabilities at the pending token and after each draft token (or tree node)."""
        if draft.parents is not None:
            return verify_tree(draft, p, generator)
        K = len(draft)
        if K:
            x = torch.tensor(draft.tokens, dtype=torch.long)  # (K,)
            idx = torch.arange(K)
            p_x = p[idx, x]  # (K,)
            q_x = draft.q[idx, x] if draft.q is not None else torch.ones(K)  # (K,); deterministic drafts: one-hot
            r = torch.rand(K, generator=generator)  # (K,) one fresh uniform per draft
            keep = r * q_x < p_x  # r < min(1, p/q) without dividing
            n = int(torch.cumprod(keep.to(torch.int64), 0).sum())  # leading run of accepted drafts
            if n < K:
                return VerifyResult(n, sample(self.residual(p[n], self._q_row(draft, n, p.shape[-1])), generator),
                                    "recovered")
        return VerifyResult(K, sample(p[K], generator), "bonus")

    @staticmethod
    def _q_row(draft: Draft, i: int, V: int) -> torch.Tensor:
        if draft.q is not None:
            return draft.q[i]
        q = torch.zeros(V)
        q[draft.tokens[i]] = 1.0
        return q

    @staticmethod
    def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """norm(max(0, p - q)): the distribution of the recovered token. (V,) -> (V,)."""
        d = torch.clamp(p - q, min=0.0)  # (V,)
        z = d.sum()
        # z == 0 only when p == q up to rounding, where a rejection has probability ~0; p is then the right law.
        return d / z if z > 0 else p
