"""Block verification: Sun, Mendlovic, Leviathan, Aharoni, Ro, Beirami, Suresh 2025, "Block Verification Accelerates
Speculative Decoding" (ICLR 2025, Algorithm 2).

Token-level verification (Leviathan et al. 2023) decides each draft on its own and stops at the first rejection.
Block verification decides how much of the chain to keep jointly. With draft x_1 .. x_γ, drafter laws q_i and target
laws p_i (p_{γ+1} after the whole block), it carries a weight w_i:

    w_0 = 1,   w_i = min(1, w_{i−1} · p_i(x_i) / q_i(x_i))
    residual at i:  r_i ∝ max(0, w_i · p_{i+1} − q_{i+1})        (i < γ; r_γ = p_{γ+1})
    h_γ = w_γ,   h_i = ρ_i / (ρ_i + 1 − w_i)  with ρ_i = Σ_x max(0, w_i · p_{i+1}(x) − q_{i+1}(x))   (1 ≤ i < γ)

and keeps τ = the largest i with η_i ≤ h_i (fresh uniforms η_i; τ = 0 if there is none), then emits x_1 .. x_τ and
one token from r_τ — *recovered* when τ < γ, *bonus* when τ = γ. The output law is exactly the target's (the
paper's Theorem 1; `tests/test_block.py` checks it by exact enumeration), and the expected number of tokens per
round is never below token-level verification's (optimal among valid rules). With γ = 1 it is token-level
verification. Deterministic drafts (q = None) are one-hot. Token trees go to the tree rule
(`verispec.verifiers.tree`).
"""

from __future__ import annotations

import torch

from verispec.sampling import sample
from verispec.types import Draft, VerifyResult
from verispec.verifiers.tree import verify_tree


class BlockVerifier:
    name = "block"
    lossless = True

    def verify(self, draft: Draft, p: torch.Tensor, generator: torch.Generator | None) -> VerifyResult:
        """p: (K+1, V) target probabilities at the pending token and after each draft token."""
        if draft.parents is not None:
            return verify_tree(draft, p, generator)
        K = len(draft)
        if K == 0:
            return VerifyResult(0, sample(p[0], generator), "bonus")
        P = p.double()  # (K+1, V)
        Q = torch.zeros_like(P[:K])  # (K, V)
        x = torch.tensor(draft.tokens, dtype=torch.long)  # (K,)
        if draft.q is None:
            Q[torch.arange(K), x] = 1.0  # deterministic drafts are one-hot
        else:
            Q.copy_(draft.q.double())
        ratio = P[torch.arange(K), x] / Q[torch.arange(K), x]  # (K,) p_i(x_i) / q_i(x_i)
        w = [1.0]
        for i in range(K):
            w.append(min(1.0, w[-1] * float(ratio[i])))
        residual = torch.clamp(torch.tensor(w[:K], dtype=torch.float64)[:, None] * P[:K] - Q, min=0.0)  # (K, V)
        rho = residual.sum(-1)  # (K,) ρ_0 .. ρ_{K-1}
        eta = torch.rand(K, generator=generator, dtype=torch.float64)  # (K,) η_1 .. η_K
        tau = 0
        for i in range(K, 0, -1):  # the largest i with η_i <= h_i
            if i == K:
                h = w[K]
            else:
                den = float(rho[i]) + 1.0 - w[i]
                h = float(rho[i]) / den if den > 0 else 1.0
            if float(eta[i - 1]) <= h:
                tau = i
                break
        if tau == K:
            return VerifyResult(K, sample(P[K], generator), "bonus")
        r = residual[tau]  # (V,) max(0, w_τ p_{τ+1} − q_{τ+1})
        z = r.sum()
        # z == 0 only when w_τ p == q everywhere: then a rejection had probability ~0 and p is the right law
        return VerifyResult(tau, sample(r / z if z > 0 else P[tau], generator), "recovered")
