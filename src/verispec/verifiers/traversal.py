"""Traversal verification for token trees: Weng, Hu, Chen, Liu, Mei, Qiu, Tian, Shi 2025, "Traversal Verification
for Speculative Tree Decoding" (arXiv 2505.12398, NeurIPS 2025).

Token-level tree verification (`verispec.verifiers.tree`: SpecInfer, RRSw) walks down from the root and decides each
child on its own ratio p/q; a rejected node takes its whole subtree with it. Traversal verification walks up from the
leaves: it accepts or rejects whole sequences root → node, leaves first, and a rejected node only updates its
parent, whose remaining children and whose own sequence stay candidates. On a chain it is block verification
(Sun et al. 2025, `verispec.verifiers.block`), to which chains are handed.

In the paper's notation: X_t is a node (the sequence from the root to it), x_t its token, M_b(·|X) the target's law at
X (over X's children), M_s(·|X) the drafter's, p_α(X) the probability of accepting the sequence X. Initially
M_b(·|X) is the target's row for X and

    p_α(root) = 1,   p_α(X_t) = min(1, p_α(X_{t−1}) · M_b(x_t|X_{t−1}) / M_s(x_t|X_{t−1})).

Then, repeatedly, take the first leaf X_t of what is left of the tree in post-order (first child, its first child, ...)
and draw η ~ U(0, 1):

- η < p_α(X_t): accept X_t. Emit its path and one token from M_b(·|X_t): *bonus* if X_t is a leaf of the drafted
  tree (M_b is still the target's law), *recovered* if its children were all deleted (M_b is then a residual).
- otherwise delete X_t and update its parent X_{t−1} (right-hand sides taken before the update):

      S = Σ_x max(0, p_α(X_{t−1}) M_b(x|X_{t−1}) − M_s(x|X_{t−1}))
      M_b(·|X_{t−1}) ← max(0, p_α(X_{t−1}) M_b(·|X_{t−1}) − M_s(·|X_{t−1})) / S
      p_α(X_{t−1})   ← S / (S + 1 − p_α(X_{t−1}))
      M_s(·|X_{t−1}) ← the law the parent's next child was drawn from,

  and the p_α of the parent's remaining subtrees follow from the formula above with the new values (computed here
  when the walk enters them). The root keeps p_α = 1 (S / (S + 0)), so the walk always ends at an accepted node.

Which drafts it is exact for. M_s when child c is tried is `Draft.q` row c: the law c was drawn from given its
earlier siblings, the contract the tree rule already relies on. Where the paper's M_s update removes the deleted
token and renormalises (siblings drawn without replacement, `verispec.drafters.children.without_replacement`),
reading the row from the draft also covers i.i.d. siblings (M_s stays q, `children.iid`) and deterministic ones
(q = None: one-hot, as REST, Lookahead and top-k trees report; p_α is then a product of target probabilities and
the rule keeps on average as many tokens as the token-level one: the gain is on sampled trees).

Why it is exact, by induction on the subtree under X with values (p_α, M_b): the walk ends accepting in it, with
next token y and then s, with probability p_α · M_b(y) · target(s | X, y), and deletes X with probability 1 − p_α.
A leaf does so by definition. A child c ~ M_s is accepted through its subtree (induction) with first token y with
mass M_s(y) · min(1, p_α M_b(y) / M_s(y)) = min(M_s(y), p_α M_b(y)), and deleted with probability 1 − p_α + S.
What is still owed is max(0, p_α M_b − M_s) = S · M_b' and X's deletion, 1 − p_α; divided by 1 − p_α + S these are
exactly the updated p_α and M_b, whichever token c carried, so the next sibling (drawn from its own row given c)
continues the induction. At the root p_α = 1: the output law is the target's. The proof needs each node's token to
follow its row given its ancestors and earlier siblings, independently of what was drafted under the earlier
siblings; how many children a node gets, or whether it is expanded, may depend on tokens already drawn
(`verispec.drafters.draft_tree` skips repeated i.i.d. tokens). tests/test_traversal.py checks i.i.d.,
without-replacement and top-k trees by exact enumeration. There is no fallback: every draft the tree rule is exact
for is covered.

Greedy decoding is the one-hot limit: nodes off the target's argmax get p_α = 0, nodes on it keep p_α = 1, and the
longest path of argmax tokens is kept. A rejected node adds only O(V) work at its parent; each node is tested at
most once.
"""

from __future__ import annotations

import torch

from verispec.sampling import sample
from verispec.types import Draft, VerifyResult
from verispec.verifiers.block import BlockVerifier


class TraversalVerifier:
    name = "traversal"
    lossless = True

    def verify(self, draft: Draft, p: torch.Tensor, generator: torch.Generator | None) -> VerifyResult:
        """p: (1 + K, V) target probabilities at the pending token (row 0) and after each draft node (row 1 + i)."""
        if draft.parents is None:
            return BlockVerifier().verify(draft, p, generator)  # a chain: traversal verification is block verification
        K = len(draft.tokens)
        children: dict[int, list[int]] = {}
        for i, a in enumerate(draft.parents[:K]):  # side nodes (after K) are scored, never verified
            children.setdefault(a, []).append(i)
        M_b_rows = p.double()  # (1 + K, V); residuals are renormalised repeatedly: keep them accurate
        M_s_rows = None if draft.q is None else draft.q.double()  # (K, V); None: deterministic nodes, one-hot
        path: list[int] = []

        def walk(X: int, p_alpha: float, M_b: torch.Tensor) -> VerifyResult | None:
            """The post-order walk of X's subtree (X = -1: the pending token): the result, or None if X is deleted."""
            for c in children.get(X, []):
                x = draft.tokens[c]
                M_s = None if M_s_rows is None else M_s_rows[c]  # (V,) what c was drawn from, given earlier siblings
                num, den = p_alpha * float(M_b[x]), (1.0 if M_s is None else float(M_s[x]))
                p_alpha_c = min(1.0, num / den) if den > 0 else float(num > 0)  # min(1, p_α M_b(x) / M_s(x))
                path.append(c)
                out = walk(c, p_alpha_c, M_b_rows[c + 1])
                if out is not None:
                    return out
                path.pop()
                # c is deleted: the parent keeps only what c's subtree could not emit
                if M_s is None:
                    d = p_alpha * M_b  # (V,)
                    d[x] = 0.0  # max(0, p_α M_b − onehot(x)): p_α M_b(x) <= 1
                else:
                    d = torch.clamp(p_alpha * M_b - M_s, min=0.0)  # (V,)
                S = float(d.sum())
                # S == 0: p_α M_b <= M_s everywhere, nothing is left to emit below X, so p_α becomes 0; at the root
                # (p_α = 1) that means M_b == M_s up to rounding, the deletion had probability ~0: keep M_b, p_α = 1
                if S > 0:
                    M_b = d / S
                p_alpha = S / (S + 1.0 - p_alpha) if S + 1.0 - p_alpha > 0 else 1.0
            kids = children.get(X, [])
            if X >= 0 and not self._accept(p_alpha, generator):
                return None  # X deleted; the root (p_α = 1) is never
            return VerifyResult(len(path), self._draw(M_b, generator), "recovered" if kids else "bonus", list(path))

        return walk(-1, 1.0, M_b_rows[0])

    # The two random choices, separate so tests can enumerate the rule's outcomes exactly.
    def _accept(self, p_alpha: float, generator: torch.Generator | None) -> bool:
        """η < p_α with a fresh η ~ U(0, 1)."""
        return float(torch.rand((), generator=generator, dtype=torch.float64)) < p_alpha

    def _draw(self, M_b: torch.Tensor, generator: torch.Generator | None) -> int:
        """The new token: one draw from M_b (V,) at the accepted node."""
        return sample(M_b, generator)
