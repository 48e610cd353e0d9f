"""Lookahead decoding: Fu, Bailis, Stoica, Zhang 2024, "Break the Sequential Dependency of LLM Inference Using
Lookahead Decoding" (ICML 2024). An independent implementation on verispec's token-tree forward.

No draft model. Every target forward carries, next to the pending token, two branches:

- the **lookahead branch**: a 2D Jacobi window of W columns and N - 1 levels. Level 0 is a chain of W guesses
  for the next positions; the token at level l, column i is a child of the token at level l - 1, column i, so it
  sits at position offset i + l + 1 and sees level 0's columns 0..i and its own column's lower levels. The
  target's argmax at the top level's W tokens is the next Jacobi iterate. Each column then yields an N-gram
  (level 0 .. level N-2 of that column, plus the new token), stored in the **n-gram pool** under its first token;
  the window drops level 0 and takes the new tokens as its top level. The first N - 2 rounds only fill the
  window (warm-up). These W (N - 1) nodes are scored but never verified (`Draft.side_tokens`).
- the **verification branch**: up to G pooled n-grams that start with the pending token, cut to γ tokens and
  merged into a trie, verified as a token tree (`verifiers/tree.py`). The drafts are deterministic (one-hot), so
  under sampling the tree rule keeps the target's distribution exactly.

Choices made here: level 0 starts as W tokens drawn from the prompt with a fixed seed (the paper starts from random
tokens); the guesses are the target's argmax at any temperature (only speed depends on them); the pool keeps the G
most recent distinct continuations per first token (oldest dropped, so memory is at most V·G n-grams);
`pool_from_text=True` also seeds the pool with the n-grams of the prompt and of committed output (the reference
code's "pool from prompt" option), off by default so that `lookahead` is the paper's method.
"""

from __future__ import annotations

import random
from collections import OrderedDict

from verispec.drafters.base import Drafter
from verispec.types import Draft
from verispec.validate import check_bool, check_int


class LookaheadDrafter(Drafter):
    name = "lookahead"

    def __init__(self, window: int = 4, ngram: int = 4, guesses: int = 4, pool_from_text: bool = False,
                 seed: int = 0):
        self.W = check_int("window", window, 1)
        self.N = check_int("ngram", ngram, 2)
        self.G = check_int("guesses", guesses, 1)
        self.pool_from_text = check_bool("pool_from_text", pool_from_text)
        self.seed = check_int("seed", seed, 0)
        self.pool: dict[int, OrderedDict[tuple[int, ...], None]] = {}  # first token -> continuations (N - 1)
        self.levels: list[list[int]] = []  # the Jacobi window: levels[l][i], at most N - 1 levels of W tokens
        self._seen = 0

    @classmethod
    def from_ctx(cls, ctx) -> "LookaheadDrafter":
        return cls(**ctx.options)

    # -- the n-gram pool -------------------------------------------------------------------------------------
    def add(self, gram: tuple[int, ...]) -> None:
        """Store an n-gram under its first token; the G most recent distinct continuations are kept."""
        conts = self.pool.setdefault(gram[0], OrderedDict())
        conts.pop(gram[1:], None)
        conts[gram[1:]] = None
        while len(conts) > self.G:
            conts.popitem(last=False)

    def _index_text(self, tokens: list[int], start: int) -> None:
        for j in range(max(start - self.N + 1, 0), len(tokens) - self.N + 1):
            self.add(tuple(tokens[j:j + self.N]))

    def prefill(self, tokens):
        self.pool.clear()
        rng = random.Random(self.seed)
        self.levels = [[rng.choice(tokens) for _ in range(self.W)]]
        if self.pool_from_text:
            self._index_text(tokens, 0)
        self._seen = len(tokens)

    # -- one round --------------------------------------------------------------------------------------------
    def propose(self, tokens, gamma, policy, sampling, generator) -> Draft:
        if gamma <= 0:
            return Draft([], None, self.name)
        x: list[int] = []
        parents: list[int] = []
        child: dict[tuple[int, int], int] = {}  # (parent node, token) -> node: the candidates merged into a trie
        for cont in reversed(self.pool.get(tokens[-1], {})):  # most recent first
            at = -1
            for t in cont[:gamma]:
                node = child.get((at, t))
                if node is None:
                    node = child[(at, t)] = len(x)
                    x.append(t)
                    parents.append(at)
                at = node
        K = len(x)
        side, side_parents = [], []
        for l, level in enumerate(self.levels):
            for i, t in enumerate(level):
                side.append(t)
                if l == 0:
                    side_parents.append(-1 if i == 0 else K + i - 1)  # level 0 is one chain
                else:
                    side_parents.append(K + (l - 1) * self.W + i)  # the same column, one level down
        return Draft(x, None, self.name, parents=parents, side_tokens=side, side_parents=side_parents)

    def observe(self, draft, side_logits):
        top = len(self.levels) - 1
        new = side_logits[top * self.W:(top + 1) * self.W].argmax(-1).tolist()  # (W,) the next Jacobi iterate
        if len(self.levels) < self.N - 1:  # warm-up: the window is not full yet
            self.levels.append(new)
            return
        for i in range(self.W):
            self.add(tuple(level[i] for level in self.levels) + (new[i],))
        self.levels = self.levels[1:] + [new]

    def commit(self, tokens, draft, result):
        if len(tokens) < self._seen:  # a new generation without prefill
            self.prefill(tokens)
            return
        if self.pool_from_text:
            self._index_text(tokens, self._seen)
        self._seen = len(tokens)
