"""Cascade speculative drafting: Chen et al. 2024, "Cascade Speculative Drafting for Even Faster LLM Inference"
(CS Drafting), whose vertical cascade is also the second stage of Spector & Ré 2023, "Accelerating LLM Inference
with Staged Speculative Decoding".

Two cascades, options of one method (`cascade`):

- **Vertical** (`inner=pld|nasd`, default `pld`): the draft model M_d1 (the 0.5B) is itself decoded speculatively.
  A statistical drafter M_d2 (prompt lookup or the n-gram store, free to run) proposes up to `inner_gamma` tokens,
  M_d1 scores them all in one forward and keeps them by the same rejection rule the target uses — against M_d1's own
  distribution q. So M_d1's draft chain has exactly the law it would have without the cascade (each token i is drawn
  from q_i given the tokens before it), and the target's verifier is handed exactly those q_i rows: the whole
  cascade stays lossless. A wrong M_d2 only costs M_d1 forwards, never changes what M_d1 drafts' law (under greedy:
  its tokens). `inner=none` turns the vertical cascade off (plain `sd`).
- **Horizontal** (`horizontal=h`, default 0 = off): M_d1 drafts the first h positions, where acceptance is highest
  and worth a model forward; the later positions come from the statistical drafter (`lower=pld|nasd`) continuing
  from M_d1's tokens, as long as it has a match. Those tokens are deterministic: their q rows are one-hot, which
  the rejection rule treats exactly as a deterministic draft (keep x with probability p(x)): still lossless.

Inner rule (one-hot proposals x_j against q_j): keep x_j with probability q_j(x_j); at the first rejection draw from
q_j with x_j removed and renormalised (the residual norm(max(0, q_j − δ_{x_j}))); when all are kept draw one more
from q_{k+1}. Each emitted token's law is q at its position, so the row handed on is q_j itself, not the residual.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from verispec.cache import CachedLM
from verispec.drafters.base import Drafter, ModelDrafter, Step, bounded_chain
from verispec.drafters.draft_model import head_for
from verispec.drafters.ngram import NGramDrafter
from verispec.drafters.prompt_lookup import PromptLookupDrafter
from verispec.policies.base import DraftPolicy
from verispec.sampling import Sampling, sample
from verispec.types import Draft
from verispec.validate import check_int

LOWER = ("pld", "nasd")


class _Always(DraftPolicy):
    """The inner drafter's policy: the cascade decides the length (γ and the outer policy), not the inner drafter."""

    def next_gamma(self) -> int:  # never asked: the cascade passes its own bound
        return 1


def statistical(name: str, stop_ids: frozenset[int]) -> Drafter:
    """A free statistical drafter for the bottom of a cascade."""
    if name == "pld":
        return PromptLookupDrafter(max_ngram_size=3, min_ngram_size=1, num_pred_tokens=16, stop_ids=stop_ids)
    if name == "nasd":
        return NGramDrafter(stop_ids=stop_ids)
    raise ValueError(f"a cascade's statistical drafter must be one of {', '.join(LOWER)} (or none); got {name!r}")


def speculated_steps(lm: CachedLM, tokens: list[int], inner: Drafter | None, inner_gamma: int, gamma: int,
                     sampling: Sampling, generator: torch.Generator | None, done: list[int]) -> Iterator[Step]:
    """The draft model's own chain after `tokens`, token by token, each step (x_i, q_i, logits_i), computed by
    speculative decoding of the draft model with `inner` proposing (None: one forward per token). `done` collects
    the tokens yielded, so a caller knows where the chain stands. At most `gamma` tokens are worth computing."""
    x = done
    while True:
        room = gamma - len(x) - 1  # proposals beyond this could not be used: the forward also yields one more token
        d = inner.propose(tokens + x, min(inner_gamma, room), _ALWAYS, sampling, None).tokens \
            if inner is not None and room > 0 else []
        logits = lm.forward(tokens + x + d, n_logits=len(d) + 1)  # (k + 1, V): feeds only what the cache lacks
        q = sampling.probs(logits)  # (k + 1, V) exactly the laws M_d1 would draw from
        for j in range(len(d) + 1):
            if j == len(d):
                t = sample(q[j], generator)  # every proposal kept: the next token from q_{k+1}
            else:
                t, kept = keep_or_resample(q[j], d[j], generator)
                if not kept:
                    x.append(t)
                    yield t, q[j], logits[j]
                    break
            x.append(t)
            yield t, q[j], logits[j]
            if j == len(d):
                break


_ALWAYS = _Always()


def keep_or_resample(q: torch.Tensor, t: int, generator: torch.Generator | None) -> tuple[int, bool]:
    """The rejection rule for a one-hot proposal t against q (V,): (t, True) with probability q(t), else
    (a draw from q without t, False). The token's law is q either way."""
    p_keep = float(q[t])
    if p_keep >= 1.0 or (p_keep > 0.0 and float(torch.rand((), generator=generator, dtype=torch.float64)) < p_keep):
        return t, True
    residual = q.clone()  # (V,) q without the rejected proposal, renormalised by `sample`
    residual[t] = 0.0
    return sample(residual, generator), False


class CascadeDrafter(ModelDrafter):
    name = "cascade"

    def __init__(self, model: torch.nn.Module, vocab_size: int, stop_ids: frozenset[int] = frozenset(),
                 inner: str = "pld", inner_gamma: int = 8, horizontal: int = 0, lower: str = "pld",
                 head: torch.nn.Module | None = None):
        self.lm = CachedLM(model, vocab_size, head=head, lean=True)
        self.stop_ids = frozenset(stop_ids)
        self.inner = None if inner in (None, "none") else statistical(inner, self.stop_ids)
        self.inner_gamma = check_int("inner_gamma", inner_gamma, 1)
        self.horizontal = check_int("horizontal", horizontal, 0)
        self.lower = statistical(lower, self.stop_ids) if self.horizontal else None
        if self.lower is not None and self.inner is not None and lower == inner:
            self.lower = self.inner  # one index serves both levels
        self.vocab_size = vocab_size

    @classmethod
    def from_ctx(cls, ctx) -> "CascadeDrafter":
        opts = dict(ctx.options)
        head = head_for(ctx, opts.pop("draft_vocab", 0), opts.pop("vocab_corpus", None))
        return cls(ctx.drafter.model, ctx.target.vocab_size, ctx.stop_ids, head=head, **opts)

    def _statistical(self) -> list[Drafter]:
        return [d for d in {id(d): d for d in (self.inner, self.lower) if d is not None}.values()]

    def prefill(self, tokens):
        super().prefill(tokens)
        for d in self._statistical():
            d.prefill(tokens)

    def commit(self, tokens, draft, result):
        super().commit(tokens, draft, result)
        for d in self._statistical():
            d.commit(tokens, draft, result)

    def propose(self, tokens, gamma, policy, sampling, generator) -> Draft:
        if gamma <= 0:
            return Draft([], None, self.name)
        h = min(gamma, self.horizontal) if self.horizontal else gamma  # positions the model drafts
        x: list[int] = []
        steps = speculated_steps(self.lm, list(tokens), self.inner, self.inner_gamma, h, sampling, generator, [])
        x, qs = bounded_chain(steps, h, policy, self.stop_ids)
        if len(x) == h < gamma and (not x or x[-1] not in self.stop_ids) and self.lower is not None:
            x, qs = self._horizontal(list(tokens), x, qs, gamma, policy, sampling)
        return Draft(x, torch.stack(qs) if qs else None, self.name)  # q: (K, V)

    def _horizontal(self, tokens, x, qs, gamma, policy, sampling):
        """The positions after the model's h: the lower drafter continues from the model's tokens (one-hot rows)."""
        more = self.lower.propose(tokens + x, gamma - len(x), _ALWAYS, sampling, None).tokens
        for t in more:
            q = torch.zeros(self.vocab_size)  # (V,) one-hot: a deterministic draft
            q[t] = 1.0
            x, qs = x + [t], qs + [q]
            if t in self.stop_ids or not policy.keep_drafting(len(x) - 1, None, None):
                break
        return x, qs
