"""Greedy speculative decoding must reproduce plain greedy decoding token for token."""

from __future__ import annotations

import copy

import pytest
import torch

import verispec
from verispec.cache import CachedLM
from verispec.drafters.base import Drafter
from verispec.engine import decode
from verispec.policies import FixedGamma
from verispec.sampling import Sampling
from verispec.types import Draft
from verispec.verifiers import RejectionVerifier

PROMPT = [3, 17, 42, 5, 9]


class DisagreeingDrafter(Drafter):
    """Deterministic drafter that always proposes a token the target does *not* pick greedily."""

    name = "disagree"

    def __init__(self, target):
        self.target = target

    def propose(self, tokens, gamma, policy, sampling, generator):
        x: list[int] = []
        for _ in range(gamma):
            with torch.no_grad():
                best = int(self.target(torch.tensor([tokens + x])).logits[0, -1].argmax())
            x.append((best + 1) % self.target.config.vocab_size)
        return Draft(x, None, self.name)


def ar(target, n, prompt=PROMPT):
    return verispec.generate(target, prompt, max_new_tokens=n).token_ids


def run(target, drafter, gamma, n, prompt=PROMPT):
    return decode(CachedLM(target), drafter, RejectionVerifier(), FixedGamma(gamma), prompt, max_new_tokens=n,
                  sampling=Sampling(), stop_ids=verispec.load_model(target).stop_ids, method="test",
                  generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("gamma", range(1, 9))
def test_same_drafter_accepts_everything_and_matches_ar(pair, gamma):
    target, _ = pair
    out = verispec.generate(target, PROMPT, drafter=copy.deepcopy(target.model), gamma=gamma, max_new_tokens=40)
    assert out.token_ids == ar(target.model, 40)
    s = out.stats
    assert s.acceptance_rate == 1.0 and s.recovered == 0
    assert len(s.steps) >= 3  # several verify rounds
    assert s.mat == pytest.approx(40 / len(s.steps))
    assert s.target_forwards == len(s.steps) == -(-40 // (gamma + 1))  # ceil: every round emits gamma + 1


@pytest.mark.parametrize("gamma", range(1, 9))
def test_disagreeing_drafter_accepts_nothing_and_matches_ar(pair, gamma):
    target, _ = pair
    ids, s = run(target.model, DisagreeingDrafter(target.model), gamma, 25)
    assert ids == ar(target.model, 25)
    assert s.accepted == 0 and s.recovered == len(s.steps) - s.bonus
    assert s.mat == 1.0


@pytest.mark.parametrize("gamma", [1, 2, 3, 5, 8])
def test_independent_drafter_matches_ar(pair, gamma):
    target, drafter = pair
    out = verispec.generate(target, PROMPT, drafter=drafter, gamma=gamma, max_new_tokens=40)
    assert out.token_ids == ar(target.model, 40)
    assert out.stats.new_tokens == 40 == sum(st.emitted for st in out.stats.steps)


@pytest.mark.parametrize("eos_at", [0, 3, 6, 7])
@pytest.mark.parametrize("gamma", [1, 4, 8])
def test_stop_token_inside_and_outside_a_draft_block(pair, eos_at, gamma):
    target, _ = pair
    plain = ar(target.model, 30)
    eos = plain[eos_at]
    first = plain.index(eos)  # generation ends at the first occurrence
    model = copy.deepcopy(target.model)
    model.config.eos_token_id = eos
    model.generation_config.eos_token_id = eos
    expected = plain[: first + 1]
    assert ar(model, 30) == expected
    for drafter in (copy.deepcopy(model), DisagreeingDrafter(model)):
        if isinstance(drafter, torch.nn.Module):
            out = verispec.generate(model, PROMPT, drafter=drafter, gamma=gamma, max_new_tokens=30)
            ids, stats = out.token_ids, out.stats
        else:
            ids, stats = run(model, drafter, gamma, 30)
        assert ids == expected
        assert stats.stop_reason == "stop_token"


def test_budget_is_exact_and_drafts_never_exceed_it(pair):
    target, _ = pair
    for n in (1, 2, 5, 9):
        out = verispec.generate(target, PROMPT, drafter=copy.deepcopy(target.model), gamma=4, max_new_tokens=n)
        assert len(out.token_ids) == n
        assert out.stats.drafted + len(out.stats.steps) == n  # no draft beyond the budget


def test_single_token_prompt(pair):
    target, drafter = pair
    assert verispec.generate(target, [7], drafter=drafter, max_new_tokens=12).token_ids == ar(target.model, 12, [7])


def test_sampling_is_reproducible_from_the_seed(pair):
    target, drafter = pair
    s = Sampling(temperature=1.0, seed=123)
    a = verispec.generate(target, PROMPT, drafter=drafter, sampling=s, max_new_tokens=20).token_ids
    b = verispec.generate(target, PROMPT, drafter=drafter, sampling=s, max_new_tokens=20).token_ids
    assert a == b


def test_text_prompt_and_stats_summary(pair):
    target, drafter = pair
    out = verispec.generate(target, "w1 w2 w3", drafter=drafter, gamma=3, max_new_tokens=10)
    assert out.prompt_ids == [2, 3, 4]
    assert isinstance(out.text, str) and len(out.text.split()) == 10
    s = out.stats.summary()
    assert s["drafter_forwards"] == s["drafted"]  # one draft-model forward per drafted token
    assert s["target_forwards"] == s["steps"]
    assert abs(s["t_draft"] + s["t_verify"] + s["t_other"] + s["t_prefill"] - s["t_total"]) < 0.05
