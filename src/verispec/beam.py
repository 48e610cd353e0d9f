"""Beam search baseline with a KV cache (batch = beams; the cache is reordered after each step).

Scores are sums of target log-probabilities; finished hypotheses are ranked by score / length**length_penalty,
as in HF transformers. Not lossless in the speculative sense: it is a different decoding rule, kept as a baseline.
"""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache

from verispec.types import GenerationStats, StepStats


@torch.inference_mode()
def beam_search(model: torch.nn.Module, prompt: list[int], *, num_beams: int = 4, max_new_tokens: int = 128,
                stop_ids: frozenset[int] = frozenset(), length_penalty: float = 1.0
                ) -> tuple[list[int], GenerationStats]:
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    B = num_beams
    stats = GenerationStats(method="beam", prompt_tokens=len(prompt))
    t_start = time.perf_counter()
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)

    def step(ids: torch.Tensor) -> torch.Tensor:  # (b, T) -> (b, V) log-probs of the next token
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return torch.log_softmax(out.logits[:, -1].float(), dim=-1)

    logp = step(torch.tensor([prompt], device=device))  # (1, V)
    stats.t_prefill = time.perf_counter() - t_start
    stats.target_prefill_forwards = 1
    V = logp.shape[-1]
    cache.batch_repeat_interleave(B)
    logp = logp.expand(B, V)  # (B, V)
    scores = torch.full((B,), float("-inf"), device=device)  # (B,); only beam 0 is alive at the start
    scores[0] = 0.0
    seqs: list[list[int]] = [[] for _ in range(B)]
    finished: list[tuple[float, float, list[int]]] = []  # (normalised score, raw score, tokens)
    forwards = 0
    for t in range(max_new_tokens):
        t0 = time.perf_counter()
        top, idx = (scores[:, None] + logp).view(-1).topk(2 * B)  # (2B,)
        nxt: list[tuple[float, int, int]] = []
        for rank, (s, i) in enumerate(zip(top.tolist(), idx.tolist())):
            b, tok = divmod(i, V)
            if tok in stop_ids:
                if rank < B:
                    finished.append((s / (t + 1) ** length_penalty, s, seqs[b] + [tok]))
            else:
                nxt.append((s, b, tok))
            if len(nxt) == B:
                break
        finished = sorted(finished, key=lambda f: -f[0])[:B]
        best_running = nxt[0][0] / (t + 1) ** length_penalty
        done = len(finished) == B and finished[-1][0] >= best_running
        seqs = [seqs[b] + [tok] for _, b, tok in nxt]
        scores = torch.tensor([s for s, _, _ in nxt], device=device)
        if done or t == max_new_tokens - 1:
            stats.steps.append(StepStats(0, 0, "bonus", 1, 0.0, time.perf_counter() - t0, 0.0))
            break
        cache.reorder_cache(torch.tensor([b for _, b, _ in nxt], device=device))
        logp = step(torch.tensor([[tok] for _, _, tok in nxt], device=device))  # (B, V)
        forwards += 1
        stats.steps.append(StepStats(0, 0, "bonus", 1, 0.0, time.perf_counter() - t0, 0.0))
    for s, seq in zip(scores.tolist(), seqs):  # running beams compete with the finished ones at the end
        finished.append((s / len(seq) ** length_penalty, s, seq))
    best = max(finished, key=lambda f: f[0])
    stats.target_forwards = forwards + 1  # the prefill forward also yields the first token's scores
    stats.target_prefill_forwards = 0
    stats.target_tokens_processed = len(prompt) + forwards * B
    stats.new_tokens = len(best[2])
    stats.stop_reason = "stop_token" if best[2] and best[2][-1] in stop_ids else "max_new_tokens"
    stats.extra = {"score": best[1], "num_beams": B}
    stats.t_total = time.perf_counter() - t_start
    return best[2], stats
