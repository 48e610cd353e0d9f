"""NASD: N-gram Assisted Speculative Decoding, the project seed's model-free baseline.

An n-gram store over the committed token ids (prompt + output so far) predicts the next token from the
longest context it has seen, backing off to shorter contexts down to the 1-token context (Katz-style back-off,
without discounting: a draft only has to be *likely*, the verifier makes the output exact). The store learns
online: `prefill` adds the prompt, `commit` adds the tokens the verifier kept, so a rejected draft never enters
it. A draft of up to γ tokens chains the store's own predictions as context.

The draft is deterministic, so its draft distribution is one-hot (q = None) and the shared rejection verifier
(Leviathan et al. 2023; Chen et al. 2023) keeps x_i with probability p_i(x_i) and, at the first rejection,
samples the recovered token from norm(max(0, p_i - onehot(x_i))). The seed's implementation instead drew a fresh
sample after a mismatch, which biases the output (romsto/Speculative-Decoding does the same); here nothing is ever resampled by the
drafter. The seed's store also never consulted the 1-token context; here it is the last back-off level.

Prediction rule: the most frequent continuation of a context, ties to the most recent one.
Memory bound: at most `max_contexts` contexts (all lengths together), evicting the least recently *updated*
context (LRU on writes: a context is refreshed each time it occurs in the committed text), and at most
`max_continuations` continuations per context, evicting the least frequent one (ties: the least recent),
whose count is forgotten. The defaults (65,536 x 8) bound the store to about 40 MB.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from verispec.drafters.base import Drafter, bounded_chain
from verispec.validate import check_int
from verispec.types import Draft


class _Continuations:
    """Counts of the tokens seen after one context (insertion order = recency) and the current best token."""

    __slots__ = ("counts", "best")

    def __init__(self):
        self.counts: dict[int, int] = {}
        self.best: int | None = None

    def add(self, token: int, cap: int) -> None:
        c = self.counts.pop(token, 0) + 1  # pop + reinsert moves the token to the most recent end
        if len(self.counts) >= cap:  # make room: drop the least frequent, the least recent among equals
            victim = min(self.counts, key=self.counts.__getitem__)  # min keeps the first (oldest) minimum
            del self.counts[victim]
            if victim == self.best:
                self.best = None
        self.counts[token] = c
        if self.best is None or c >= self.counts[self.best]:  # >=: ties go to the most recent
            self.best = token


class NGramStore:
    """Contexts of 1 .. max_n - 1 tokens -> continuation counts, bounded by max_contexts x max_continuations."""

    def __init__(self, max_n: int = 4, max_contexts: int = 65_536, max_continuations: int = 8):
        self.max_n = check_int("max_n", max_n, 2)  # n-gram = (n - 1)-token context + 1 continuation
        self.max_contexts = check_int("max_contexts", max_contexts, 1)
        self.max_continuations = check_int("max_continuations", max_continuations, 1)
        self._table: OrderedDict[tuple[int, ...], _Continuations] = OrderedDict()  # least recently updated first

    def __len__(self) -> int:
        return len(self._table)

    def clear(self) -> None:
        self._table.clear()

    def add(self, context: tuple[int, ...], token: int) -> None:
        entry = self._table.get(context)
        if entry is None:
            if len(self._table) >= self.max_contexts:
                self._table.popitem(last=False)  # evict the least recently updated context
            entry = self._table[context] = _Continuations()
        else:
            self._table.move_to_end(context)
        entry.add(token, self.max_continuations)

    def update(self, tokens: Sequence[int], start: int = 0) -> None:
        """Add every n-gram that ends at a position j >= start of `tokens` (one call per newly committed span)."""
        for j in range(max(start, 1), len(tokens)):
            # longest context first, so the general 1-token contexts are the freshest for eviction
            for k in range(min(self.max_n - 1, j), 0, -1):
                self.add(tuple(tokens[j - k:j]), tokens[j])

    def counts(self, context: Sequence[int]) -> dict[int, int]:
        """Continuation counts of exactly this context (empty if unseen); for inspection and tests."""
        entry = self._table.get(tuple(context))
        return dict(entry.counts) if entry else {}

    def predict(self, context: Sequence[int], min_context: int = 1, min_count: int = 1
                ) -> tuple[int, int, int] | None:
        """Back off from the longest context (max_n - 1 tokens) to `min_context` tokens; the first context whose
        best continuation was seen at least `min_count` times answers. Returns (token, context length, count) or
        None when no level matches."""
        for k in range(min(self.max_n - 1, len(context)), min_context - 1, -1):
            entry = self._table.get(tuple(context[len(context) - k:]))
            if entry is not None:
                c = entry.counts[entry.best]
                if c >= min_count:
                    return entry.best, k, c
        return None


class NGramDrafter(Drafter):
    """Drafts by chaining NGramStore predictions; deterministic (q = None, one-hot for the verifier).

    min_context / min_count: only contexts at least this long whose best continuation was seen at least this
    often may predict (1 / 1 = plain NASD back-off; the hybrid drafter raises them to mean "confident").
    """

    name = "ngram"

    def __init__(self, max_n: int = 4, max_contexts: int = 65_536, max_continuations: int = 8,
                 min_context: int = 1, min_count: int = 1, stop_ids: frozenset[int] = frozenset()):
        self.store = NGramStore(max_n, max_contexts, max_continuations)
        self.min_context = check_int("min_context", min_context, 1, self.store.max_n - 1)
        self.min_count = check_int("min_count", min_count, 1)
        self.stop_ids = frozenset(stop_ids)
        self._seen = 0  # committed tokens already in the store

    @classmethod
    def from_ctx(cls, ctx) -> "NGramDrafter":
        return cls(**ctx.options, stop_ids=ctx.stop_ids)

    def prefill(self, tokens):
        self.store.clear()
        self.store.update(tokens)
        self._seen = len(tokens)

    def commit(self, tokens, draft, result):
        # Only committed tokens enter the store: the drafts the verifier rejected are not in `tokens`.
        if len(tokens) < self._seen:  # the engine only appends; a shorter sequence means a new generation
            self.prefill(tokens)
            return
        self.store.update(tokens, self._seen)
        self._seen = len(tokens)

    def propose(self, tokens, gamma, policy, sampling, generator) -> Draft:
        def steps():
            n = self.store.max_n - 1  # the longest context the store can use
            ctx = list(tokens[-n:])
            # no match at any level ends the draft early (possibly with no token)
            while (hit := self.store.predict(ctx, self.min_context, self.min_count)) is not None:
                ctx = (ctx + [hit[0]])[-n:]  # chain the draft's own tokens as context
                yield hit[0], None, None

        return Draft(bounded_chain(steps(), gamma, policy, self.stop_ids)[0], None, self.name)
