"""Small dataclasses passed between the engine's stages (proposer -> scorer -> verifier -> commit).

Vocabulary follows vLLM's spec_decode (see `verispec.metrics`): *accepted* tokens are drafts kept, the *recovered*
token is sampled from the residual at the first rejection, the *bonus* token is sampled from the target when every
draft was accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from verispec.metrics import acceptance_by_position, speculative


@dataclass
class Draft:
    """What a drafter proposes for one verify round.

    tokens: the K draft token ids. For a chain, in order; for a token tree, one id per tree node.
    q: (K, V) the exact distributions each token was sampled from, after the same sampling transform as the
       target; None for deterministic drafters, which the verifier treats as one-hot. In a sampled tree, row i is
       what node i was drawn from *given its earlier siblings* (the parent's q for i.i.d. children; q with the
       earlier siblings removed and renormalised for children drawn without replacement).
    source: which drafter produced the tokens (for hybrid drafters' statistics).
    parents: None for a chain; for a token tree, the parent node of each of the K nodes (-1 = the pending token,
       i.e. the last committed token), every parent listed before its children, siblings in the order they were
       drawn (the order the verifier tries them). Deterministic siblings carry distinct tokens; i.i.d. sampled
       siblings may repeat one (a repeat is never kept).
    side_tokens / side_parents: extra nodes the target scores in the same forward without verifying them (e.g.
       Lookahead decoding's Jacobi window); a parent index < K names a draft node, K + j the side node j, -1 the
       pending token. Their logits go back to the drafter through `Drafter.observe`.

    len(draft) is the number of positions drafted: K for a chain, the tree's depth for a tree.
    """

    tokens: list[int]
    q: torch.Tensor | None = None  # (K, V)
    source: str = ""
    parents: list[int] | None = None
    side_tokens: list[int] = field(default_factory=list)
    side_parents: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        if self.parents is None:
            return len(self.tokens)
        return max(self.depths()[:len(self.tokens)], default=0)

    @property
    def is_chain(self) -> bool:
        return self.parents is None and not self.side_tokens

    def node_parents(self) -> list[int]:
        """Parent of each draft node then each side node (a chain's nodes are each other's parents)."""
        K = len(self.tokens)
        return (self.parents if self.parents is not None else list(range(-1, K - 1))) + self.side_parents

    def depths(self) -> list[int]:
        """Depth of each draft node then each side node (1 = child of the pending token)."""
        d: list[int] = []
        for i, a in enumerate(self.node_parents()):
            if not -1 <= a < i:
                raise ValueError(f"tree node {i} has parent {a}; parents must come before their children")
            d.append(1 if a < 0 else d[a] + 1)
        return d


@dataclass
class VerifyResult:
    """Outcome of verifying one draft: `accepted` leading drafts kept, then one new target token."""

    accepted: int
    token: int
    kind: str  # "recovered" (sampled from the residual) or "bonus" (all drafts accepted)
    path: list[int] | None = None  # for a tree: the accepted node indices, root to leaf

    def emitted(self, draft: Draft) -> list[int]:
        if self.path is not None:
            return [draft.tokens[i] for i in self.path] + [self.token]
        return draft.tokens[: self.accepted] + [self.token]


@dataclass
class StepStats:
    """One engine step: one target forward over the pending token plus `drafted` drafts."""

    drafted: int
    accepted: int
    kind: str
    emitted: int  # tokens actually appended (can be fewer than accepted + 1 when EOS or the budget ends)
    t_draft: float
    t_verify: float
    t_other: float
    source: str = ""
    extra: dict = field(default_factory=dict)  # policy-specific records (e.g. entropy)
    nodes: int = 0  # draft tokens the target scored (a chain: drafted; a tree: its node count)


@dataclass
class GenerationStats:
    """Per-generation statistics; every number is derived from `steps` plus forward counters."""

    method: str
    steps: list[StepStats] = field(default_factory=list)
    prompt_tokens: int = 0
    new_tokens: int = 0
    target_forwards: int = 0  # decode forwards (prefill excluded)
    drafter_forwards: int = 0  # decode forwards of a draft model (prefill excluded)
    target_prefill_forwards: int = 0
    drafter_prefill_forwards: int = 0
    target_tokens_processed: int = 0  # tokens fed to the target, prefill included (for FLOPs estimates)
    drafter_tokens_processed: int = 0
    t_prefill: float = 0.0
    t_total: float = 0.0
    stop_reason: str = ""
    extra: dict = field(default_factory=dict)  # method-specific results (e.g. a beam's score)

    def speculative(self) -> dict:
        """α̂, MAT, γ used, acceptance by position, ... (`verispec.metrics.speculative`)."""
        return speculative([s.drafted for s in self.steps], [s.accepted for s in self.steps])

    @property
    def drafted(self) -> int:
        return sum(s.drafted for s in self.steps)

    @property
    def accepted(self) -> int:
        return sum(s.accepted for s in self.steps)

    @property
    def recovered(self) -> int:
        return sum(s.kind == "recovered" for s in self.steps)

    @property
    def bonus(self) -> int:
        return sum(s.kind == "bonus" for s in self.steps)

    @property
    def acceptance_rate(self) -> float | None:
        """α̂ = accepted / drafted (None when nothing was drafted)."""
        return self.speculative()["acceptance_rate"]

    @property
    def mat(self) -> float | None:
        """Mean accepted tokens per target forward = (accepted + recovered + bonus) / target forwards."""
        return self.speculative()["mat"]

    def acceptance_by_position(self) -> list[tuple[int, int]]:
        """[(drafted at position i, accepted at position i)] for i = 0 .. max draft length - 1."""
        return acceptance_by_position([s.drafted for s in self.steps], [s.accepted for s in self.steps])

    @property
    def t_draft(self) -> float:
        return sum(s.t_draft for s in self.steps)

    @property
    def t_verify(self) -> float:
        return sum(s.t_verify for s in self.steps)

    @property
    def t_other(self) -> float:
        return sum(s.t_other for s in self.steps)

    def summary(self) -> dict:
        return {
            "method": self.method,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            **self.speculative(),
            "recovered": self.recovered,
            "bonus": self.bonus,
            "target_forwards": self.target_forwards,
            "drafter_forwards": self.drafter_forwards,
            "target_prefill_forwards": self.target_prefill_forwards,
            "drafter_prefill_forwards": self.drafter_prefill_forwards,
            "target_tokens_processed": self.target_tokens_processed,
            "drafter_tokens_processed": self.drafter_tokens_processed,
            "t_prefill": self.t_prefill,
            "t_draft": self.t_draft,
            "t_verify": self.t_verify,
            "t_other": self.t_other,
            "t_total": self.t_total,
            "tokens_per_s": self.new_tokens / self.t_total if self.t_total else None,
            "stop_reason": self.stop_reason,
            **self.extra,
        }
