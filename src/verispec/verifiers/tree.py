"""Token-tree verification: multi-step speculative sampling over the children of each node.

SpecInfer (Miao et al. 2024, "SpecInfer: Accelerating Large Language Model Serving with Tree-based Speculative
Inference and Verification", multi-step speculative sampling) and recursive rejection sampling (Jeon et al. 2024,
"Recursive Speculative Decoding: Accelerating LLM Inference via Sampling Without Replacement") are one recursion,
applied to the children of a node in the order they were drawn. Child j of a node comes with q_j, the exact
distribution it was drawn from *given the children drawn before it* (`Draft.q` row of that node):

    r ← p (the target's law at the node)
    for each child x_j:  keep x_j with probability min(1, r(x_j) / q_j(x_j))   (a fresh uniform)
                         else r ← norm(max(0, r − q_j)) and try the next child
    no child kept: the *recovered* token is drawn from r; a leaf: the *bonus* token from the leaf's p.

Each step is an ordinary rejection-sampling step whose proposal is q_j conditionally on everything before it, so
whatever is emitted at the node follows r at the start of that step, and by induction the target's p. What differs
between the methods is only how the drafter drew the children, i.e. which q_j it reports:

- deterministic children (n-gram, REST, Lookahead, top-k trees): q_j = one-hot(x_j) (`Draft.q` None). The step
  keeps x_j with probability r(x_j) and otherwise removes x_j from r — the rule REST and Lookahead use.
- SpecInfer's i.i.d. children: q_j = q, the drafter's distribution at the node, for every j
  (`verispec.drafters.children.iid`). Duplicates are possible; a repeated token is never kept (a rejection leaves
  r(x) = 0), so drafters do not expand them.
- recursive rejection sampling without replacement (RRSw): q_j = q with x_1 .. x_{j-1} removed and renormalised
  (`verispec.drafters.children.without_replacement`, sequential draws, the same law as Gumbel-top-k). No
  duplicates, and each rejection removes a token from both r and q: more is accepted than with i.i.d. children.

Greedy decoding is the one-hot limit: p is one-hot, so a child is kept iff it is the target's argmax.
"""

from __future__ import annotations

import torch

from verispec.sampling import sample
from verispec.types import Draft, VerifyResult


def try_children(r: torch.Tensor, tokens: list[int], qs: list[torch.Tensor | None],
                 generator: torch.Generator | None) -> tuple[int | None, torch.Tensor]:
    """One node's multi-step speculative sampling: (index of the child kept or None, the law left over).

    r: (V,) the target's law at the node; tokens / qs: the children in draw order with the distribution each was
    drawn from (None = one-hot on its token)."""
    r = r.double()  # (V,) the residuals are renormalised repeatedly: keep them accurate
    for j, (x, q) in enumerate(zip(tokens, qs)):
        q = None if q is None else q.double()  # (V,)
        q_x = 1.0 if q is None else float(q[x])
        if float(torch.rand((), generator=generator, dtype=torch.float64)) * q_x < float(r[x]):
            return j, r  # kept with probability min(1, r(x) / q(x)), without dividing
        if q is None:
            d = r.clone()
            d[x] = 0.0  # max(0, r − onehot(x)): a rejected one-hot draft leaves r without x
        else:
            d = torch.clamp(r - q, min=0.0)  # (V,)
        z = d.sum()
        # z == 0 only when r <= q everywhere, i.e. r == q up to rounding: a rejection then had probability ~0
        r = d / z if z > 0 else r
    return None, r


def verify_tree(draft: Draft, p: torch.Tensor, generator: torch.Generator | None) -> VerifyResult:
    """p: (1 + K, V) target probabilities at the pending token (row 0) and at each draft node (row 1 + i)."""
    children: dict[int, list[int]] = {}
    for i, a in enumerate(draft.node_parents()[:len(draft.tokens)]):
        children.setdefault(a, []).append(i)
    at, path = -1, []
    while True:
        kids = children.get(at, [])
        qs = [None if draft.q is None else draft.q[c] for c in kids]  # (V,) each: what child c was drawn from
        kept, r = try_children(p[at + 1], [draft.tokens[c] for c in kids], qs, generator)
        if kept is None:
            return VerifyResult(len(path), sample(r, generator), "recovered" if kids else "bonus", path)
        at = kids[kept]
        path.append(at)
