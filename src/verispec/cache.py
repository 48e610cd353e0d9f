"""A causal LM bound to its KV cache: the only place in verispec that edits a cache.

The cache always holds the KV entries of a prefix of the sequence this model has been asked about (`ids`).
Before every forward the cache is cropped to the longest prefix it shares with the requested sequence, so after
a rejection both models end exactly as if only the kept tokens had been fed (the rule that decides
losslessness of the KV state). Positions are explicit: the cache length is the position of the next token.

Token trees (SpecInfer, Lookahead) are scored in one forward with a custom 4D attention mask and explicit position
ids: every node sees the committed prefix and its own ancestors, at position = prefix length + depth - 1. Their KV
entries then sit side by side in the cache; the next rollback keeps only the nodes on the path that matches the
committed tokens (copied into contiguous slots, as Medusa does) and drops the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from verispec.types import Draft

# Attention implementations that read a custom 4D mask (the native backend's per-row kernel among them).
MASK_AWARE = ("sdpa", "eager", "verispec_native")


def output_width(model: torch.nn.Module) -> int:
    """Rows of the output layer (any module with `out_features`, e.g. nn.Linear or a backend's packed linear)."""
    head = model.get_output_embeddings()
    return int(getattr(head, "out_features", None) or head.weight.shape[0])


class CachedLM:
    """One HF causal LM, batch size 1, plus a DynamicCache and forward/token counters."""

    def __init__(self, model: torch.nn.Module, vocab_size: int | None = None, head=None, lean: bool = False):
        self.model = model
        # lean=True (drafters only): chains run verispec.rewrites.lean's forward where the model family is known —
        # same operations, none of transformers' per-call overhead, not bit-identical to it. Targets never use it.
        # A model on the gguf backend always takes that backend's NativeDecoder: bit-identical to transformers'
        # forward there (tested), so a target may use it too.
        from verispec.backends.native import NativeDecoder, is_native

        self.lean = None
        if is_native(model):
            self.lean = NativeDecoder(model)
        elif lean:
            from verispec.rewrites.lean import lean_decoder

            self.lean = lean_decoder(model)
            if self.lean is not None:  # a fast-int4 drafter's layers may run as one C++ call
                from verispec.backends.step import int4_step

                self.lean.make_step = int4_step
        # Optional replacement output layer: hidden (n, H) -> logits (n, vocab_size), run after the model's body
        # (e.g. a drafter's vocabulary-trimmed head). None = the model's own forward.
        self.head = head
        self.device = next(model.parameters()).device
        # Width of the distributions handed to the verifier: logits are padded (-inf) or cut to it, so a drafter
        # whose embedding table is padded differently from the target's still speaks the target's vocabulary.
        self.vocab_size = vocab_size or output_width(model)
        self.cache: DynamicCache | None = None
        self.ids: list[int] = []
        # After a tree forward: the scored nodes' tokens and parents (-1 = ids[-1]); their KV entries follow ids.
        self.tree: tuple[list[int], list[int]] | None = None
        self.forwards = 0
        self.tokens_processed = 0
        # The target's hidden states for drafters that read them (`track_features`): rows aligned with the cache.
        self.tap = None
        self.feats = None

    def reset(self) -> None:
        self.cache = DynamicCache(config=self.model.config)
        self.ids = []
        self.tree = None
        self.forwards = 0
        self.tokens_processed = 0
        if self.tap is not None:
            from verispec.features import FeatureBuffer

            self.feats = FeatureBuffer(self.tap.width)

    def track_features(self, spec) -> None:
        """Keep the hidden states `spec` names (see `verispec.features`) for every cached position from now on:
        `features` then holds one row per token in the cache. The cache starts empty (entries cached before have no
        features)."""
        from verispec.features import FeatureTap

        self.untrack_features()
        self.tap = FeatureTap(self.model, spec)
        self.reset()

    def untrack_features(self) -> None:
        """Remove the hooks (the model may be shared: nothing of ours stays on it after a generation)."""
        if self.tap is not None:
            self.tap.close()
        self.tap = self.feats = None

    @property
    def features(self) -> torch.Tensor:
        """(len(ids), F): the tracked features of every position in the cache (row i: after tokens[:i + 1])."""
        if self.feats is None:
            raise ValueError("no features are tracked: call track_features(spec) first")
        return self.feats.view()[: len(self.ids)]

    def _took(self, n_rows: int, rows: torch.Tensor | None = None) -> None:
        """After a forward that fed n_rows new cache entries: append their features (the tap's, or `rows`)."""
        if self.tap is None:
            return
        rows = self.tap.take() if rows is None else rows
        if rows.shape[0] != n_rows:
            raise RuntimeError(f"the feature tap saw {rows.shape[0]} rows for {n_rows} fed: this forward path does not "
                               "compute features for every row (only the target's forward paths do)")
        self.feats.append(rows)

    def rollback(self, tokens: Sequence[int], limit: int | None = None) -> int:
        """Crop the cache to the longest common prefix with `tokens` (at most `limit`); return its length."""
        if self.tree is not None:
            self._settle_tree(tokens)
        n = min(len(self.ids), len(tokens) if limit is None else min(limit, len(tokens)))
        i = 0
        ids = self.ids
        while i < n and ids[i] == tokens[i]:
            i += 1
        if i < len(ids):
            self.cache.crop(i - len(ids))  # negative count = tokens to drop (transformers 5 API)
            del ids[i:]
        if self.feats is not None:
            self.feats.crop(i)
        return i

    @torch.inference_mode()
    def forward(self, tokens: Sequence[int], n_logits: int = 1) -> torch.Tensor:
        """Logits for the last `n_logits` positions of `tokens`, feeding only what the cache lacks.

        Returns (n_logits, vocab_size) float logits; row j predicts the token after tokens[len - n_logits + j].
        """
        if self.cache is None:
            self.reset()
        if not 1 <= n_logits <= len(tokens):
            raise ValueError(f"n_logits={n_logits} must be in [1, {len(tokens)}]")
        keep = self.rollback(tokens, limit=len(tokens) - n_logits)  # positions we need logits for are re-fed
        new = list(tokens[keep:])
        input_ids = torch.tensor([new], dtype=torch.long, device=self.device)  # (1, T)
        if self.lean is not None:
            hidden = self.lean(input_ids, self.cache, n_logits)  # (n_logits, H)
            head = self.head if self.head is not None else self.model.get_output_embeddings()
            logits = head(hidden)  # (n_logits, V)
        elif self.head is not None:
            hidden = self.model.get_decoder()(input_ids=input_ids, past_key_values=self.cache, use_cache=True)
            logits = self.head(hidden.last_hidden_state[0, -n_logits:])  # (n_logits, V)
        else:
            out = self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True,
                             logits_to_keep=n_logits)
            logits = out.logits[0]  # (n_logits, V)
        self.ids.extend(new)
        self._took(len(new))
        self.forwards += 1
        self.tokens_processed += len(new)
        return self._fit_vocab(logits)

    @torch.inference_mode()
    def score(self, tokens: Sequence[int], draft: Draft) -> torch.Tensor:
        """Logits at the pending token tokens[-1], at each draft node and at each side node: (1 + K + S, V).

        A chain is an ordinary forward; a tree (or any side nodes) gets a tree attention mask and position ids.
        """
        if draft.is_chain:
            return self.forward(list(tokens) + draft.tokens, n_logits=len(draft.tokens) + 1)
        if self.cache is None:
            self.reset()
        if getattr(self.lean, "trees", False):
            # the native decoder's ragged forward reads any mask per row: the same bits as transformers' forward
            # there (tests/test_native.py), without its per-call overhead
            seg = self.plan(tokens, draft)
            hidden = self.lean.ragged([seg])  # (1 + K + S, H)
            head = self.head if self.head is not None else self.model.get_output_embeddings()
            logits = head(hidden)  # (1 + K + S, V)
            seg.done()
            return self._fit_vocab(logits)
        depths = draft.depths()
        nodes = draft.tokens + draft.side_tokens
        parents = draft.node_parents()
        keep = self.rollback(tokens, limit=len(tokens) - 1)
        chain = list(tokens[keep:])  # the pending token, plus any committed tokens the cache lacks
        m, n = len(chain), len(nodes)
        Q = m + n
        allowed = tree_allowed(keep, m, parents)  # (Q, KV)
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros(1, 1, Q, keep + Q, dtype=dtype, device=self.device)  # (1, 1, Q, KV) additive
        mask.masked_fill_(~allowed.to(self.device), torch.finfo(dtype).min)
        pos = list(range(keep, keep + m)) + [keep + m - 1 + d for d in depths]
        position_ids = torch.tensor([pos], dtype=torch.long, device=self.device)  # (1, Q)
        input_ids = torch.tensor([chain + nodes], dtype=torch.long, device=self.device)  # (1, Q)
        if self.model.config._attn_implementation not in MASK_AWARE:
            self.model.set_attn_implementation("sdpa")  # kernels that ignore a custom 4D mask would be wrong here
        out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=n + 1)
        self.ids.extend(chain)
        self._took(Q)
        self.tree = (nodes, parents)
        self.forwards += 1
        self.tokens_processed += Q
        return self._fit_vocab(out.logits[0])  # (1 + K + S, V)

    @torch.inference_mode()
    def extend_tree(self, tokens: Sequence[int], parents: Sequence[int]) -> torch.Tensor:
        """Add nodes to the tree of the last `score` (or `extend_tree`) and return their logits: (len(tokens), V).

        parents index the tree so far plus these nodes (-1 = the pending token); each new node sees the cached
        prefix and its ancestors, so its logits equal those of one `score` over the whole tree, and only the new
        nodes are fed (a drafter growing a tree level by level)."""
        if self.tree is None:
            raise ValueError("extend_tree needs the tree of a previous score() in the cache")
        old_nodes, old_parents = self.tree
        nodes, allp = old_nodes + list(tokens), old_parents + list(parents)
        base, n_old, n = len(self.ids), len(old_nodes), len(tokens)
        depth: list[int] = []
        for i, a in enumerate(allp):
            if not -1 <= a < i:
                raise ValueError(f"tree node {i} has parent {a}; parents must come before their children")
            depth.append(1 if a < 0 else depth[a] + 1)
        allowed = torch.zeros(n, base + n_old + n, dtype=torch.bool)  # (n, KV) True = may attend
        allowed[:, :base] = True
        for j in range(n):
            i = n_old + j
            while i >= 0:  # the node itself and its ancestors
                allowed[j, base + i] = True
                i = allp[i]
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros(1, 1, n, base + n_old + n, dtype=dtype, device=self.device)  # (1, 1, n, KV) additive
        mask.masked_fill_(~allowed.to(self.device), torch.finfo(dtype).min)
        pos = [base - 1 + depth[n_old + j] for j in range(n)]
        out = self.model(input_ids=torch.tensor([list(tokens)], dtype=torch.long, device=self.device),
                         position_ids=torch.tensor([pos], dtype=torch.long, device=self.device), attention_mask=mask,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=n)
        self.tree = (nodes, allp)
        self._took(n)
        self.forwards += 1
        self.tokens_processed += n
        return self._fit_vocab(out.logits[0])  # (n, V)

    def _settle_tree(self, tokens: Sequence[int]) -> None:
        """Keep the KV entries of the tree path that matches `tokens` after ids; drop every other node. (If ids
        itself disagrees with `tokens`, the prefix crop that follows in rollback drops the kept path too.)"""
        nodes, parents = self.tree
        self.tree = None
        base = len(self.ids)
        path: list[int] = []
        at = -1
        for t in tokens[base:]:
            at = next((i for i, (x, a) in enumerate(zip(nodes, parents)) if a == at and x == t), None)
            if at is None:
                break
            path.append(at)
        idx = torch.tensor(list(range(base)) + [base + i for i in path], dtype=torch.long, device=self.device)
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is None or type(layer).__name__ != "DynamicLayer":
                raise ValueError(f"token trees need a plain DynamicCache; got {type(layer).__name__}")
            layer.keys = layer.keys.index_select(-2, idx)
            layer.values = layer.values.index_select(-2, idx)
        if self.feats is not None:
            self.feats.select(idx)
        self.ids.extend(nodes[i] for i in path)

    @torch.inference_mode()
    def prefill(self, tokens: Sequence[int]) -> None:
        """Fill the cache with `tokens` without computing any logits (the lm_head is the costliest layer)."""
        if self.cache is None:
            self.reset()
        keep = self.rollback(tokens)
        new = list(tokens[keep:])
        if not new:
            return
        input_ids = torch.tensor([new], dtype=torch.long, device=self.device)  # (1, T)
        body = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
        if self.lean is not None:  # the same decoder as every later forward (a layer-skip view has fewer layers)
            self.lean(input_ids, self.cache, 1)
        elif body is not None:
            body(input_ids=input_ids, past_key_values=self.cache, use_cache=True)
        else:  # fall back to a full forward that keeps a single logit row
            self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.ids.extend(new)
        self._took(len(new))
        self.forwards += 1
        self.tokens_processed += len(new)

    def plan(self, tokens: Sequence[int], draft: Draft | None = None, n_logits: int = 1,
             prefill: bool = False) -> "Segment | None":
        """What `forward` (draft None), `score` (a draft) or `prefill` would feed, as a Segment of a ragged batched
        forward (`run_batch`); the cache is cropped as they crop it. None when a prefill has nothing to feed."""
        if self.cache is None:
            self.reset()
        if prefill:
            keep = self.rollback(tokens)
            new = list(tokens[keep:])
            if not new:
                return None
            return Segment(self, new, list(range(keep, keep + len(new))), None, 0, call=("prefill", tokens))
        if draft is None or draft.is_chain:
            seq = list(tokens) + ([] if draft is None else draft.tokens)
            n_logits = n_logits if draft is None else len(draft.tokens) + 1
            if not 1 <= n_logits <= len(seq):
                raise ValueError(f"n_logits={n_logits} must be in [1, {len(seq)}]")
            keep = self.rollback(seq, limit=len(seq) - n_logits)
            new = seq[keep:]
            call = ("forward", tokens, n_logits) if draft is None else ("score", tokens, draft)
            return Segment(self, new, list(range(keep, keep + len(new))), None, n_logits, call=call)
        keep = self.rollback(tokens, limit=len(tokens) - 1)
        chain = list(tokens[keep:])
        nodes, parents = draft.tokens + draft.side_tokens, draft.node_parents()
        pos = list(range(keep, keep + len(chain))) + [keep + len(chain) - 1 + d for d in draft.depths()]
        return Segment(self, chain + nodes, pos, tree_allowed(keep, len(chain), parents), len(nodes) + 1,
                       tree=(nodes, parents), n_chain=len(chain), call=("score", tokens, draft))

    @property
    def row_exact(self) -> bool:
        """Whether a position's KV entries depend on the tokens up to it only, never on how the forward was cut
        (the gguf backend's per-row kernels): then another cache's entries for a shared prefix are exactly ours."""
        return getattr(self.lean, "row_exact", False)

    def adopt_prefix(self, donor: "CachedLM", n: int) -> None:
        """Start this cache as a copy of donor's first n entries (a prompt prefix both sequences share), instead of
        computing them again. Only where both are row-exact on the same model: then the copy is bit-identical to
        what our own prefill would compute."""
        if not (self.row_exact and donor.model is self.model) or donor.tree is not None:
            raise ValueError("a prefix is adopted only from a settled cache of the same row-exact model")
        if not 0 < n <= len(donor.ids):
            raise ValueError(f"cannot adopt {n} entries from a cache of {len(donor.ids)}")
        if self.tap is not None and (donor.tap is None or donor.tap.spec != self.tap.spec):
            raise ValueError("a prefix is adopted only from a cache that tracks the same target features")
        self.reset()
        for i, layer in enumerate(donor.cache.layers):
            self.cache.update(layer.keys[..., :n, :], layer.values[..., :n, :], i)  # cat: our own copy
        self.ids = list(donor.ids[:n])
        if self.feats is not None:
            self.feats.append(donor.feats.view()[:n])

    def _fit_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        v = logits.shape[-1]
        if v == self.vocab_size:
            return logits
        if v > self.vocab_size:
            return logits[..., : self.vocab_size]
        pad = logits.new_full((*logits.shape[:-1], self.vocab_size - v), float("-inf"))
        return torch.cat([logits, pad], dim=-1)


def tree_allowed(keep: int, m: int, parents: Sequence[int]) -> torch.Tensor:
    """(m + n, keep + m + n) bool, True = may attend: `m` chain tokens after `keep` cached ones, then n tree nodes
    (parents index the nodes, -1 = the last chain token); every node sees the prefix, its ancestors and itself."""
    n = len(parents)
    Q = m + n
    allowed = torch.zeros(Q, keep + Q, dtype=torch.bool)  # (Q, KV)
    allowed[:, :keep] = True
    allowed[:m, keep:keep + m] = torch.ones(m, m, dtype=torch.bool).tril()
    allowed[m:, keep:keep + m] = True
    for i, a in enumerate(parents):  # a node sees its ancestors (rows already filled) and itself
        if a >= 0:
            allowed[m + i, keep + m:] = allowed[m + a, keep + m:]
        allowed[m + i, keep + m + i] = True
    return allowed


@dataclass
class Segment:
    """One sequence's part of a ragged batched forward: `new` tokens at `positions` after the `len(lm.ids)` tokens
    in lm's cache; `allowed` (T, P + T) bool for a tree, None for a causal chain; logits for the last `n_out` rows.
    `tree` / `n_chain` (for a tree: its nodes and parents, and how many chain tokens precede them) are what `score`
    records for the next rollback."""

    lm: CachedLM
    new: list[int]
    positions: list[int]
    allowed: torch.Tensor | None
    n_out: int
    tree: tuple[list[int], list[int]] | None = None
    n_chain: int = 0
    call: tuple = ()  # the solo call this segment stands for: (method name, *arguments)

    def causal_mask(self) -> torch.Tensor:
        P, T = len(self.lm.ids), len(self.new)
        return self.allowed if self.allowed is not None else torch.ones(T, P + T, dtype=torch.bool).tril(P)

    def done(self, rows: torch.Tensor | None = None) -> None:
        """The bookkeeping `forward` / `score` / `prefill` do after their forward (rows: this segment's features)."""
        lm = self.lm
        lm._took(len(self.new), rows)
        if self.tree is not None:
            lm.ids.extend(self.new[: self.n_chain])
            lm.tree = self.tree
        else:
            lm.ids.extend(self.new)
        lm.forwards += 1
        lm.tokens_processed += len(self.new)


def _ragged_ok(segs: list[Segment]) -> bool:
    """One ragged forward serves these segments only when they share the model, the output layer and a decoder
    with a ragged forward (the native decoder: any mask; the lean one: causal chains)."""
    first = segs[0].lm
    dec = first.lean
    if len(segs) < 2 or dec is None or not hasattr(dec, "ragged"):
        return False
    if any(s.lm.model is not first.model or s.lm.head is not first.head for s in segs):
        return False
    return getattr(dec, "trees", False) or all(s.allowed is None for s in segs)


@torch.inference_mode()
def run_batch(segs: list[Segment]) -> list[torch.Tensor | None]:
    """Feed every segment in one ragged forward (one matrix of all rows for the linear layers, attention per
    sequence over its own cache); return each segment's (n_out, V) logits (None where n_out = 0).

    On the gguf backend every row is computed by per-row code, so each segment's logits and KV entries are
    bit-identical to its own solo `forward` / `score` / `prefill` (tested). Models without a ragged decoder run
    the segments one by one, exactly as solo calls would."""
    if not segs:
        return []
    if not _ragged_ok(segs):
        # The plan already cropped each cache; the solo call crops to the same prefix and feeds exactly s.new.
        return [getattr(s.lm, s.call[0])(*s.call[1:]) for s in segs]
    lm0 = segs[0].lm
    hidden = lm0.lean.ragged(segs)  # (sum n_out, H)
    head = lm0.head if lm0.head is not None else lm0.model.get_output_embeddings()
    logits = head(hidden) if hidden.shape[0] else None  # (sum n_out, V)
    out, at, row = [], 0, 0
    for s in segs:
        # every tap saw all stacked rows of this forward: a segment's features are its own span of them
        s.done(None if s.lm.tap is None else s.lm.tap.take()[row: row + len(s.new)])
        row += len(s.new)
        if s.n_out:
            out.append(s.lm._fit_vocab(logits[at: at + s.n_out]))
            at += s.n_out
        else:
            out.append(None)
    return out


def score_batch(lms: Sequence[CachedLM], token_lists: Sequence[Sequence[int]], drafts: Sequence[Draft]
                ) -> list[torch.Tensor]:
    """`lm.score(tokens, draft)` for every sequence, in one ragged forward where the model allows it."""
    return run_batch([lm.plan(t, d) for lm, t, d in zip(lms, token_lists, drafts)])


def forward_batch(lms: Sequence[CachedLM], token_lists: Sequence[Sequence[int]], n_logits: int = 1
                  ) -> list[torch.Tensor]:
    """`lm.forward(tokens, n_logits)` for every sequence, in one ragged forward where the model allows it."""
    return run_batch([lm.plan(t, n_logits=n_logits) for lm, t in zip(lms, token_lists)])


def prefill_batch(lms: Sequence[CachedLM], token_lists: Sequence[Sequence[int]]) -> None:
    """`lm.prefill(tokens)` for every sequence, in one ragged forward where the model allows it."""
    run_batch([s for s in (lm.plan(t, prefill=True) for lm, t in zip(lms, token_lists)) if s is not None])
