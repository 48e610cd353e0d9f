"""Draft-model token trees: the small model grows a tree of candidates per round, the target scores the whole tree in
one forward (tree attention mask, `verispec.cache`), and the multi-step tree rule verifies it
(`verispec.verifiers.tree`).

Two ways to grow the tree:

- **sampled children** (`children="without_replacement"`, the default, or `"iid"`): at depth d every frontier node
  gets `widths[d]` children drawn from the drafter's distribution q at that node — without replacement (recursive
  rejection sampling, Jeon et al. 2024) or i.i.d. (SpecInfer, Miao et al. 2024); see `verispec.drafters.children`.
  Each node reports the exact distribution it was drawn from, so the verifier keeps the target's law exactly.
  Repeated i.i.d. tokens and stop tokens are not expanded (neither can lead anywhere: a repeat is never kept, and
  nothing follows a stop token).
- **top-k children** (`children="topk"`, and always under greedy decoding, where q is one-hot): EAGLE-2's dynamic
  tree (Li et al. 2024). From the root take the `top_k` most likely tokens; at each depth every frontier node proposes
  its `top_k` children scored by cumulative log-probability, the best `top_k` of them become the next frontier; at the
  end the `nodes` best nodes over all depths are kept (a child never outscores its parent, so they form a tree).
  The children are a deterministic function of the drafter's logits: verified as one-hot drafts (q = None), which is
  lossless under sampling too. Scores use the drafter's raw softmax (temperature 1).

The depth is min(γ, len(widths)) for sampled trees and γ for top-k trees; γ comes from the policy. Each depth
costs one drafter forward (the root from its ordinary forward, deeper levels as tree forwards over the nodes so
far). Shape options: `tree="3x2x1"` (children per node at each depth), `children`, `top_k`, `nodes`.
"""

from __future__ import annotations

import torch

from verispec.cache import CachedLM
from verispec.drafters.base import ModelDrafter
from verispec.drafters.children import SCHEMES
from verispec.types import Draft
from verispec.validate import check_int

CHILDREN = (*SCHEMES, "topk")


def parse_widths(tree) -> tuple[int, ...]:
    """'3x2x1', '3,2,1' or a sequence of ints -> (3, 2, 1): children per node at each depth."""
    parts = str(tree).replace(",", "x").split("x") if isinstance(tree, (str, int)) else list(tree)
    try:
        widths = tuple(int(w) for w in parts)
    except (TypeError, ValueError):
        widths = ()
    if not widths or any(w < 1 for w in widths):
        raise ValueError(f"tree must give children per depth as positive integers, e.g. '3x2x1'; got {tree!r}")
    return widths


class DraftTreeDrafter(ModelDrafter):
    name = "draft_tree"

    def __init__(self, model: torch.nn.Module, vocab_size: int, stop_ids: frozenset[int] = frozenset(),
                 tree="3x2x1", children: str = "without_replacement", top_k: int = 4, nodes: int = 16):
        self.widths = parse_widths(tree)
        if children not in CHILDREN:
            raise ValueError(f"children must be one of {', '.join(CHILDREN)}; got {children!r}")
        self.children = children
        self.draw_children = SCHEMES.get(children)  # (q, k, generator) -> (tokens, the q each was drawn from)
        self.top_k = check_int("top_k", top_k, 1)
        self.nodes = check_int("nodes", nodes, 1)
        self.lm = CachedLM(model, vocab_size, lean=True)  # chains take the lean forward; tree levels transformers'
        self.stop_ids = frozenset(stop_ids)

    @classmethod
    def from_ctx(cls, ctx) -> "DraftTreeDrafter":
        return cls(ctx.drafter.model, ctx.target.vocab_size, ctx.stop_ids, **ctx.options)


    def logits_at(self, tokens: list[int], nodes: list[int], parents: list[int], frontier: list[int]) -> torch.Tensor:
        """The drafter's logits at each frontier node (-1 = the pending token). (F, V)

        Level by level: the root is a chain forward, the first level one tree forward, and every later level feeds
        only its own nodes (the tree so far stays in the drafter's cache until the round's rollback)."""
        if frontier == [-1]:
            self._fed = 0
            return self.lm.forward(tokens, n_logits=1)  # (1, V)
        if self._fed == 0:
            rows = self.lm.score(tokens, Draft(list(nodes), None, self.name, parents=list(parents)))[1:]  # (N, V)
        else:
            rows = self.lm.extend_tree(nodes[self._fed:], parents[self._fed:])  # (N − fed, V)
        fed, self._fed = self._fed, len(nodes)
        return rows[[f - fed for f in frontier]]  # (F, V): the frontier is always the newest level

    def propose(self, tokens, gamma, policy, sampling, generator) -> Draft:
        if gamma <= 0:
            return Draft([], None, self.name)
        if sampling.greedy or self.children == "topk":
            return self._topk(tokens, gamma)
        return self._sampled(tokens, min(gamma, len(self.widths)), sampling, generator)

    def _sampled(self, tokens, depth, sampling, generator) -> Draft:
        nodes: list[int] = []
        parents: list[int] = []
        qs: list[torch.Tensor] = []
        frontier = [-1]
        for d in range(depth):
            q_rows = sampling.probs(self.logits_at(tokens, nodes, parents, frontier))  # (F, V)
            nxt = []
            for f, q in zip(frontier, q_rows):
                xs, q_js = self.draw_children(q, self.widths[d], generator)
                seen: set[int] = set()
                for x, q_j in zip(xs, q_js):
                    nodes.append(x)
                    parents.append(f)
                    qs.append(q_j)  # (V,) exactly what x was drawn from, given its earlier siblings
                    if x not in seen and x not in self.stop_ids:
                        nxt.append(len(nodes) - 1)
                    seen.add(x)
            frontier = nxt
            if not frontier:
                break
        return Draft(nodes, torch.stack(qs), self.name, parents=parents)  # q: (N, V)

    def _topk(self, tokens, depth) -> Draft:
        nodes: list[int] = []
        parents: list[int] = []
        score: list[float] = []  # cumulative log-probability of each node
        frontier = [-1]  # node indices (-1 = the pending token)
        for _ in range(depth):
            logq = torch.log_softmax(self.logits_at(tokens, nodes, parents, frontier).float(), -1)  # (F, V)
            top = logq.topk(min(self.top_k, logq.shape[-1]), dim=-1)  # values, indices: (F, k)
            base = torch.tensor([0.0 if f < 0 else score[f] for f in frontier])[:, None]  # (F, 1)
            cand = (base + top.values).flatten()  # (F * k,) cumulative scores of every proposed child
            best = cand.topk(min(self.top_k, cand.numel())).indices.tolist()  # the global top-k: next frontier
            nxt = []
            for c in sorted(best):  # by parent, then rank: every parent is listed before its children
                fi, j = divmod(c, top.indices.shape[1])
                nodes.append(int(top.indices[fi, j]))
                parents.append(frontier[fi])
                score.append(float(cand[c]))
                if nodes[-1] not in self.stop_ids:
                    nxt.append(len(nodes) - 1)
            frontier = nxt
            if not frontier:
                break
        return self._rerank(nodes, parents, score)

    def _rerank(self, nodes, parents, score) -> Draft:
        """The `nodes` best nodes over all depths (a child never outscores its parent: still a tree), re-indexed."""
        keep = sorted(sorted(range(len(nodes)), key=lambda i: -score[i])[:self.nodes])
        new = {old: i for i, old in enumerate(keep)}
        return Draft([nodes[i] for i in keep], None, self.name,
                     parents=[-1 if parents[i] < 0 else new[parents[i]] for i in keep])
