"""Token-tree verification of deterministic drafts: the multi-candidate rule of SpecInfer (Miao et al. 2024,
"SpecInfer: Accelerating Large Language Model Serving with Tree-based Speculative Inference and Verification",
multi-step speculative sampling) specialised to one-hot draft distributions, as Lookahead decoding (Fu et al. 2024)
and REST (He et al. 2024) use it.

At a tree node with target distribution p, the children's tokens x_1, x_2, ... are tried in order: x_j is kept with
probability p(x_j) (fresh uniform), otherwise p becomes norm(p with x_j removed) and the next child is tried. If a
child is kept the walk continues from it; if none is, the *recovered* token is sampled from what is left of p; at a
leaf the *bonus* token is sampled from the leaf's p. Each step draws exactly from p, so the output law is the
target's. Greedy is the one-hot limit: a child is kept iff it is the target's argmax.
"""

from __future__ import annotations

import torch

from verispec.sampling import sample
from verispec.types import Draft, VerifyResult


def verify_tree(draft: Draft, p: torch.Tensor, generator: torch.Generator | None) -> VerifyResult:
    """p: (1 + K, V) target probabilities at the pending token (row 0) and at each draft node (row 1 + i)."""
    if draft.q is not None:
        raise ValueError("tree verification here takes deterministic drafts (q=None); sampled trees need the "
                         "SpecInfer residual over q, which is not implemented")
    children: dict[int, list[int]] = {}
    for i, a in enumerate(draft.node_parents()[:len(draft.tokens)]):
        children.setdefault(a, []).append(i)
    at, path = -1, []
    while True:
        kids = children.get(at, [])
        r = p[at + 1].clone()  # (V,) the law the next token must follow
        nxt = None
        for c in kids:
            x = draft.tokens[c]
            if float(torch.rand((), generator=generator)) < float(r[x]):
                nxt = c
                break
            r[x] = 0.0  # rejected: renormalise over the tokens not yet tried
            z = r.sum()
            r = r / z if z > 0 else p[at + 1]
        if nxt is None:
            return VerifyResult(len(path), sample(r, generator), "recovered" if kids else "bonus", path)
        path.append(nxt)
        at = nxt
