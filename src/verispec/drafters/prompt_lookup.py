"""Prompt lookup decoding: Saxena 2023, "Prompt Lookup Decoding" (github.com/apoorvumang/prompt-lookup-decoding),
the idea behind HF transformers' PromptLookupCandidateGenerator; this is an independent implementation.

The last n tokens of the sequence (n = max_ngram_size down to min_ngram_size, longest first) are looked up in
the earlier text, and the tokens that followed the match are copied as the draft (at most num_pred_tokens, and
at most γ). Choices made here:

- min_ngram_size defaults to 1, as in HF's generator: a 1-token match is a weak signal, but a wrong draft costs
  only its share of one verify forward, and on repetitive text (code) single-token anchors often hit.
- The text searched is the prompt *and* the generated text by default (`search_generated=True`, as HF does:
  output repeats itself, e.g. a loop body); with `search_generated=False` only n-grams inside the prompt match.
- Among several matches of the same size, the *most recent* one wins (recent text is the likeliest to be
  repeating now). The continuation is copied LZ77-style: if it runs into the end of the committed text it
  goes on with the draft's own tokens, i.e. it assumes the text repeats with the period the match implies.
  So every match supplies a full-length draft.

Matching is an O(1) dictionary lookup: every n-gram (for each n in the range) that already has a following token
maps to the position of that token in its most recent occurrence, updated online as tokens are committed
(at most max_ngram_size - min_ngram_size + 1 entries per token: bounded by the model's context length).
The draft is deterministic: q = None, which the rejection verifier treats as one-hot, so it is lossless.
"""

from __future__ import annotations

from collections.abc import Sequence

from verispec.drafters.base import Drafter, bounded_chain
from verispec.validate import check_bool, check_int
from verispec.types import Draft


class PromptLookupDrafter(Drafter):
    name = "prompt_lookup"

    def __init__(self, max_ngram_size: int = 3, min_ngram_size: int = 1, num_pred_tokens: int = 10,
                 search_generated: bool = True, stop_ids: frozenset[int] = frozenset()):
        self.max_ngram_size = check_int("max_ngram_size", max_ngram_size, 1)
        self.min_ngram_size = check_int("min_ngram_size", min_ngram_size, 1, self.max_ngram_size)
        self.num_pred_tokens = check_int("num_pred_tokens", num_pred_tokens, 1)
        self.search_generated = check_bool("search_generated", search_generated)
        self.stop_ids = frozenset(stop_ids)
        self._follow: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token after its latest occurrence
        self._seen = 0  # committed tokens already indexed

    @classmethod
    def from_ctx(cls, ctx) -> "PromptLookupDrafter":
        return cls(**ctx.options, stop_ids=ctx.stop_ids)

    def _index(self, tokens: Sequence[int], start: int) -> None:
        # Token j becomes the follower of the n-grams ending just before it; later occurrences overwrite earlier.
        for j in range(max(start, 1), len(tokens)):
            for n in range(self.min_ngram_size, min(self.max_ngram_size, j) + 1):
                self._follow[tuple(tokens[j - n:j])] = j

    def prefill(self, tokens):
        self._follow.clear()
        self._index(tokens, 0)
        self._seen = len(tokens)

    def commit(self, tokens, draft, result):
        if len(tokens) < self._seen:  # the engine only appends; a shorter sequence means a new generation
            self.prefill(tokens)
            return
        if self.search_generated:
            self._index(tokens, self._seen)  # committed tokens only: rejected drafts are not in `tokens`
        self._seen = len(tokens)

    def match(self, tokens: Sequence[int]) -> tuple[int, int] | None:
        """(n, j): the longest suffix n-gram found earlier, and the index of the token that followed it."""
        for n in range(min(self.max_ngram_size, len(tokens)), self.min_ngram_size - 1, -1):
            j = self._follow.get(tuple(tokens[len(tokens) - n:]))
            if j is not None:
                return n, j
        return None

    def propose(self, tokens, gamma, policy, sampling, generator) -> Draft:
        hit = self.match(tokens) if gamma > 0 else None
        if hit is None:
            return Draft([], None, self.name)
        j, L = hit[1], len(tokens)  # j < L: only n-grams with a follower are indexed

        def steps():
            x: list[int] = []
            for i in range(self.num_pred_tokens):
                x.append(tokens[j + i] if j + i < L else x[j + i - L])  # overlapping copy continues the period
                yield x[-1], None, None

        return Draft(bounded_chain(steps(), gamma, policy, self.stop_ids)[0], None, self.name)
