"""Beam search baseline."""

from __future__ import annotations

import torch

import verispec
from tests.conftest import tiny_llama


def seq_logprob(model, prompt, ids):
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + ids])).logits[0].float(), -1)
    return sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(ids))


def test_one_beam_is_greedy(pair):
    target, _ = pair
    a = verispec.generate(target, [3, 4, 5], max_new_tokens=20).token_ids
    assert verispec.generate(target, [3, 4, 5], method="beam", num_beams=1, max_new_tokens=20).token_ids == a


def test_beam_score_is_the_sequence_log_probability_and_beats_greedy():
    model = tiny_llama(48, seed=21, scale=2.0)  # flat-ish distributions, so beams matter
    prompt = [1, 2, 3]
    wins = 0
    for n in (6, 10, 14):
        out = verispec.generate(model, prompt, method="beam", num_beams=4, max_new_tokens=n)
        assert len(out.token_ids) == n
        assert abs(out.stats.extra["score"] - seq_logprob(model, prompt, out.token_ids)) < 1e-3  # cache reorder ok
        greedy = verispec.generate(model, prompt, max_new_tokens=n).token_ids
        wins += out.stats.extra["score"] >= seq_logprob(model, prompt, greedy) - 1e-4
    assert wins == 3


def test_beam_stops_on_stop_token():
    model = tiny_llama(48, seed=21, scale=2.0)
    greedy = verispec.generate(model, [1, 2, 3], method="beam", num_beams=3, max_new_tokens=12).token_ids
    model.generation_config.eos_token_id = greedy[4]
    out = verispec.generate(model, [1, 2, 3], method="beam", num_beams=3, max_new_tokens=12)
    assert greedy[4] not in out.token_ids[:-1]
