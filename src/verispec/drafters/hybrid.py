"""Hybrid NASD + draft model: the project seed's "mixed draft source" idea.

Each round drafts from one source. When the n-gram store (NASD, see ngram.py) has a *confident* match for the
next token, the round is the n-gram continuation: free to compute, and likely to be accepted on repetitive text.
Otherwise a small draft model drafts (Leviathan et al. 2023; Chen et al. 2023), reusing DraftModelDrafter.

Confidence: a context of at least `min_context` tokens whose most frequent continuation was seen at least
`min_count` times (defaults 2 and 2: a 2-token context that has repeated with the same continuation). The
n-gram draft goes on while each chained prediction is confident and stops at the first that is not.

Why rounds are never mixed: Draft.source (and so StepStats.source) then says exactly which source drafted each
round, hence each accepted token. Losslessness: the source is chosen from the committed tokens only, an n-gram
draft is deterministic (q = None, one-hot), and a draft-model round hands over the exact distributions q its
tokens were sampled from (K, V). The draft model's KV cache skips the n-gram rounds: its CachedLM feeds the
committed tokens it lacks at its next forward and is rolled back to the committed tokens at every commit.
"""

from __future__ import annotations

from verispec.drafters.base import Drafter
from verispec.drafters.draft_model import DraftModelDrafter
from verispec.drafters.ngram import NGramDrafter
from verispec.types import Draft


class HybridDrafter(Drafter):
    name = "hybrid"

    def __init__(self, ngram: NGramDrafter, draft_model: DraftModelDrafter):
        self.ngram = ngram  # its min_context / min_count define a confident match
        self.draft_model = draft_model

    @classmethod
    def from_ctx(cls, ctx) -> "HybridDrafter":
        opts = {"min_context": 2, "min_count": 2, **ctx.options}
        return cls(NGramDrafter(**opts, stop_ids=ctx.stop_ids),
                   DraftModelDrafter(ctx.drafter.model, ctx.target.vocab_size, ctx.stop_ids))

    # The engine's counters describe the draft model (the n-gram store runs no forward).
    @property
    def forwards(self) -> int:
        return self.draft_model.forwards

    @property
    def prefill_forwards(self) -> int:
        return self.draft_model.prefill_forwards

    @property
    def tokens_processed(self) -> int:
        return self.draft_model.tokens_processed

    def prefill(self, tokens):
        self.ngram.prefill(tokens)
        self.draft_model.prefill(tokens)

    def propose(self, tokens, gamma, policy, sampling, generator) -> Draft:
        if gamma <= 0:
            return Draft([], None, "none")
        draft = self.ngram.propose(tokens, gamma, policy, sampling, generator)  # confident tokens only
        if len(draft):
            return draft  # source "ngram", q None (one-hot)
        return self.draft_model.propose(tokens, gamma, policy, sampling, generator)  # source "draft_model", q (K, V)

    def commit(self, tokens, draft, result):
        self.ngram.commit(tokens, draft, result)
        self.draft_model.commit(tokens, draft, result)  # crop the drafter's cache to the committed tokens

