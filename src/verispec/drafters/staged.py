"""Staged speculative decoding: Spector & Ré 2023, "Accelerating LLM Inference with Staged Speculative Decoding".

The paper's two changes to draft-model speculation, both here:

1. **The draft batch restructured as a tree.** Instead of one chain, the target scores a tree: the draft model's
   chain plus, at each of the first `branch_depth` depths, `width` alternative children of the same parent (leaves),
   so that when the target rejects the chain's token there, a sibling may still be kept.
2. **A second stage of speculation:** the draft model's chain is itself decoded speculatively with a free
   statistical drafter (prompt lookup or the n-gram store; the vertical cascade of `verispec.drafters.cascade`).

Departure from the paper: its tree expands the top candidates at every node of the first levels; here only the
chain's nodes get siblings (a chain with side branches), which keeps the tree small for this CPU's verify cost.

Losslessness. Under sampling the chain token at depth d is drawn from q_d (the inner rule keeps that law) and its
siblings are drawn after it *without replacement* from q_d (recursive rejection sampling, Jeon et al. 2024): each
node reports the distribution it was drawn from given its earlier siblings — q_d for the chain token, q_d with the
earlier tokens removed and renormalised for a sibling — and the multi-step tree verifier keeps the target's law.
Under greedy the siblings are the next most likely tokens: a deterministic tree, verified as one-hot.
"""

from __future__ import annotations

import torch

from verispec.drafters.base import bounded_chain
from verispec.drafters.cascade import CascadeDrafter, speculated_steps
from verispec.drafters.children import without_replacement
from verispec.types import Draft
from verispec.validate import check_int


class StagedDrafter(CascadeDrafter):
    name = "staged"

    def __init__(self, model, vocab_size, stop_ids=frozenset(), inner: str = "pld", inner_gamma: int = 8,
                 width: int = 1, branch_depth: int = 2, head=None):
        super().__init__(model, vocab_size, stop_ids, inner=inner, inner_gamma=inner_gamma, head=head)
        self.width = check_int("width", width, 0)
        self.branch_depth = check_int("branch_depth", branch_depth, 0)

    def propose(self, tokens, gamma, policy, sampling, generator) -> Draft:
        if gamma <= 0:
            return Draft([], None, self.name)
        rows: list[torch.Tensor] = []  # the drafter's logits at each chain position (for greedy siblings)

        def steps():
            for t, q, logits in speculated_steps(self.lm, list(tokens), self.inner, self.inner_gamma, gamma,
                                                 sampling, generator, []):
                rows.append(logits)
                yield t, q, logits

        chain, qs = bounded_chain(steps(), gamma, policy, self.stop_ids)
        nodes: list[int] = []
        parents: list[int] = []
        q_nodes: list[torch.Tensor] = []
        prev = -1
        for d, t in enumerate(chain):
            nodes.append(t)
            parents.append(prev)
            here = len(nodes) - 1
            if not sampling.greedy:
                q_nodes.append(qs[d])  # (V,) the chain token's own law
            if d < self.branch_depth and self.width:
                for s, q_s in self._siblings(t, qs[d] if not sampling.greedy else None, rows[d], generator):
                    nodes.append(s)
                    parents.append(prev)
                    if q_s is not None:
                        q_nodes.append(q_s)
            prev = here
        q = torch.stack(q_nodes) if q_nodes else None  # (N, V)
        return Draft(nodes, q, self.name, parents=parents)

    def _siblings(self, t: int, q: torch.Tensor | None, logits: torch.Tensor, generator):
        """Up to `width` siblings of the chain token t: drawn without replacement after t (sampling), or the next
        most likely tokens (greedy)."""
        if q is None:
            top = logits.float().topk(self.width + 1).indices.tolist()
            return [(s, None) for s in top if s != t][: self.width]
        rest = q.clone()  # (V,) q without the chain token, renormalised: the law of the first sibling
        rest[t] = 0.0
        z = float(rest.sum())
        if z <= 0:
            return []
        tokens, laws = without_replacement(rest / z, self.width, generator)
        return list(zip(tokens, laws))
