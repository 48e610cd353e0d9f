"""How a drafter draws several children of one tree node, and the distribution it must report for each.

The tree verifier (`verispec.verifiers.tree`) needs, for every child, the exact distribution it was drawn from given
the children drawn before it. Two schemes:

- `iid`: k independent draws from q (SpecInfer, Miao et al. 2024). Every child reports q; tokens may repeat.
- `without_replacement`: k sequential draws, each from q with the tokens already drawn removed and renormalised
  (recursive rejection sampling, Jeon et al. 2024; the same law as Gumbel-top-k). Child j reports that
  renormalised q_j. Needs at least k tokens with mass in q (fewer children are drawn otherwise).

Reporting another distribution than the one a child was drawn from (e.g. drawing i.i.d. but reporting the
without-replacement q_j) breaks losslessness; tests/test_draft_tree.py shows the statistic catching it.
"""

from __future__ import annotations

import torch

from verispec.sampling import sample


def iid(q: torch.Tensor, k: int, generator: torch.Generator | None) -> tuple[list[int], list[torch.Tensor]]:
    """k i.i.d. draws from q (V,); each child's distribution is q itself."""
    return [sample(q, generator) for _ in range(k)], [q] * k


def without_replacement(q: torch.Tensor, k: int, generator: torch.Generator | None
                        ) -> tuple[list[int], list[torch.Tensor]]:
    """Up to k draws without replacement from q (V,): (tokens, the renormalised distribution each came from)."""
    tokens: list[int] = []
    qs: list[torch.Tensor] = []
    q_j = q
    for _ in range(k):
        if float(q_j.sum()) <= 0:
            break  # fewer than k tokens have mass: no further distinct child exists
        x = sample(q_j, generator)
        tokens.append(x)
        qs.append(q_j)
        q_j = q_j.clone()
        q_j[x] = 0.0  # (V,) the next child is drawn from what is left
        z = q_j.sum()
        q_j = q_j / z if z > 0 else q_j
    return tokens, qs


SCHEMES = {"iid": iid, "without_replacement": without_replacement}
