"""Draft-model speculative sampling: a small LM sharing the target's vocabulary drafts γ tokens autoregressively.

Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding"; Chen et al. 2023,
"Accelerating Large Language Model Decoding with Speculative Sampling". Each draft token x_i is sampled from
q_i = transform(drafter logits) with the *same* sampling transform as the target, and exactly that q_i is handed
to the verifier (HF #47932 broke losslessness by returning a distribution it had not sampled from).
"""

from __future__ import annotations

import torch

from verispec.cache import CachedLM
from verispec.drafters.base import Drafter
from verispec.sampling import sample
from verispec.types import Draft
from verispec.validate import check_known


class DraftModelDrafter(Drafter):
    name = "draft_model"

    def __init__(self, model: torch.nn.Module, vocab_size: int, stop_ids: frozenset[int] = frozenset()):
        self.lm = CachedLM(model, vocab_size)
        self.stop_ids = stop_ids

    @classmethod
    def from_ctx(cls, ctx) -> "DraftModelDrafter":
        check_known(ctx.options, "sd", ())
        return cls(ctx.drafter.model, ctx.target.vocab_size, ctx.stop_ids)

    @property
    def forwards(self) -> int:
        return self.lm.forwards - self.prefill_forwards

    @property
    def tokens_processed(self) -> int:
        return self.lm.tokens_processed

    def prefill(self, tokens):
        self.lm.reset()
        self.lm.prefill(tokens[:-1])
        self.prefill_forwards = self.lm.forwards

    def propose(self, tokens, gamma, policy, sampling, generator) -> Draft:
        x: list[int] = []
        qs: list[torch.Tensor] = []
        for i in range(gamma):
            logits = self.lm.forward(tokens + x, n_logits=1)  # (1, V): feeds only what the cache lacks
            q_i = sampling.probs(logits)[0]  # (V,)
            x.append(sample(q_i, generator))
            qs.append(q_i)
            if x[-1] in self.stop_ids or not policy.keep_drafting(i, q_i, logits[0]):
                break  # nothing after an EOS can be kept
        q = torch.stack(qs) if qs else None  # (K, V)
        return Draft(x, q, self.name)

    def commit(self, tokens, draft, result):
        self.lm.rollback(tokens)  # drop the rejected drafts' KV entries now
