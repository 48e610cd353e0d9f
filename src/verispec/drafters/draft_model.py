"""Draft-model speculative sampling: a small LM sharing the target's vocabulary drafts γ tokens autoregressively.

Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding"; Chen et al. 2023,
"Accelerating Large Language Model Decoding with Speculative Sampling". Each draft token x_i is sampled from
q_i = transform(drafter logits) with the *same* sampling transform as the target, and exactly that q_i is handed
to the verifier (HF #47932 broke losslessness by returning a distribution it had not sampled from).

Option `draft_vocab=K` makes the drafter cheaper by computing logits for only the K most frequent tokens (FR-Spec,
`drafters/trimmed_head.py`); the frequencies come from `vocab_corpus` (a REST datastore .npz) or, for a registry
model, from the default stdlib datastore. Still lossless: q is zero outside those tokens and is what was sampled.
"""

from __future__ import annotations

import torch

from verispec.cache import CachedLM
from verispec.drafters.base import ModelDrafter, bounded_chain, chain_goes_on
from verispec.sampling import sample
from verispec.types import Draft
from verispec.validate import check_int


class DraftModelDrafter(ModelDrafter):
    name = "draft_model"

    def __init__(self, model: torch.nn.Module, vocab_size: int, stop_ids: frozenset[int] = frozenset(),
                 head: torch.nn.Module | None = None):
        self.lm = CachedLM(model, vocab_size, head=head, lean=True)  # a drafter: the lean forward where known
        self.stop_ids = stop_ids

    @classmethod
    def from_ctx(cls, ctx) -> "DraftModelDrafter":
        return cls(ctx.drafter.model, ctx.target.vocab_size, ctx.stop_ids, head=head_for(ctx, **ctx.options))

    def propose(self, tokens, gamma, policy, sampling, generator) -> Draft:
        def steps():
            x: list[int] = []
            while True:
                logits = self.lm.forward(tokens + x, n_logits=1)  # (1, V): feeds only what the cache lacks
                q_i = sampling.probs(logits)[0]  # (V,) exactly the law x_i is drawn from
                x.append(sample(q_i, generator))
                yield x[-1], q_i, logits[0]

        x, qs = bounded_chain(steps(), gamma, policy, self.stop_ids)
        return Draft(x, torch.stack(qs) if qs else None, self.name)  # q: (K, V)

    @classmethod
    def propose_batch(cls, drafters, token_lists, gammas, policies, samplings, generators) -> list[Draft]:
        """`propose` for several sequences, their draft steps sharing one ragged drafter forward each (the draft
        cost per round then grows with the batch far less than B sequential forwards). Each sequence draws from
        its own generator and stops by the same rule as `bounded_chain`."""
        from verispec.cache import forward_batch

        xs: list[list[int]] = [[] for _ in drafters]
        qs: list[list[torch.Tensor]] = [[] for _ in drafters]
        live = [j for j, g in enumerate(gammas) if g > 0]
        while live:
            logits = forward_batch([drafters[j].lm for j in live], [token_lists[j] + xs[j] for j in live])
            going = []
            for j, l in zip(live, logits):  # l: (1, V)
                q_i = samplings[j].probs(l)[0]  # (V,) exactly the law x_i is drawn from
                xs[j].append(sample(q_i, generators[j]))
                qs[j].append(q_i)
                i = len(xs[j]) - 1
                if chain_goes_on(i, xs[j][-1], q_i, l[0], policies[j], drafters[j].stop_ids) and i + 1 < gammas[j]:
                    going.append(j)
            live = going
        return [Draft(x, torch.stack(q) if q else None, cls.name) for x, q in zip(xs, qs)]  # q: (K, V)



def head_for(ctx, draft_vocab: int = 0, vocab_corpus=None) -> torch.nn.Module | None:
    """The drafter's trimmed output layer for `draft_vocab` tokens (None = its own full layer), built once per
    drafter model, size and corpus."""
    from verispec.drafters.trimmed_head import token_counts, top_ids, trimmed_head

    K = check_int("draft_vocab", draft_vocab, 0)
    V = ctx.target.vocab_size
    if K == 0 or K >= V:
        if vocab_corpus is not None:
            raise ValueError("vocab_corpus is used only with draft_vocab=K (0 < K < vocabulary size)")
        return None
    if vocab_corpus is None:
        from verispec.drafters.rest import default_datastore

        vocab_corpus = default_datastore(ctx.target)
        if vocab_corpus is None:
            raise ValueError("draft_vocab needs token frequencies: pass vocab_corpus='datastore.npz' (built by "
                             "`verispec datastore build`); only registry models have a default corpus")
    model = ctx.drafter.model
    cache = model.__dict__.setdefault("_verispec_trimmed_heads", {})
    from verispec.datastore import Datastore

    key = (K, id(vocab_corpus) if isinstance(vocab_corpus, Datastore) else str(vocab_corpus))
    if key not in cache:
        ids = top_ids(token_counts(vocab_corpus, V), K, ctx.stop_ids)
        cache[key] = trimmed_head(model, ids, V, ctx.drafter.backend)
    return cache[key]
