"""The cost-aware draft controller (policies/cost.py): its estimates and choice, the budget, and that its choices
use only what was known before the round's verification. Its losslessness (greedy equality, the sampling law) runs
with every other policy in tests/test_policies.py."""

from __future__ import annotations

import math

import pytest
import torch

import verispec
from verispec.policies import CostAware, make_policy
from verispec.policies.base import DraftPolicy
from verispec.sampling import Sampling
from verispec.types import Draft, VerifyResult
from tests.test_policies import noisy_pair

T1 = Sampling(temperature=1.0)


def feed(policy: CostAware, drafted: int, accepted: int, t_verify=None, t_draft=None, nodes=None):
    """One round as the engine reports it."""
    draft = Draft([1] * drafted, None, "test")
    result = VerifyResult(accepted, 0, "bonus" if accepted == drafted else "recovered")
    policy.update(draft, result)
    if t_verify is not None:
        policy.observe_costs(draft, t_draft, t_verify, 0.0)


def test_conditional_acceptance_is_estimated_per_position():
    """Rounds of 4 drafts that keep all 4 or none: β_1 = 1/2, but β_2..β_4 = 1 (bursty acceptance)."""
    p = CostAware(gamma_max=4, prior_weight=0.01, decay=0.999)
    p.start(T1, 8)
    for i in range(200):
        feed(p, 4, 4 if i % 2 else 0)
    beta = p.beta()
    assert beta[0] == pytest.approx(0.5, abs=0.01) and all(b > 0.98 for b in beta[1:])


def test_untested_positions_shrink_to_the_one_before():
    p = CostAware(gamma_max=6, alpha=0.6, prior_weight=2.0)
    p.start(T1, 8)
    for _ in range(50):
        feed(p, 2, 2)
    beta = p.beta()
    assert beta[0] > 0.9 and beta[2] == pytest.approx(beta[1]) and beta[5] == pytest.approx(beta[1])


def test_the_choice_maximises_expected_tokens_per_second_under_the_given_costs():
    """With a fixed curve and draft cost, the chosen γ is the argmax of E(γ)/C(γ), computed here by hand."""
    curve = {1: 100.0, 16: 250.0}  # T(k) = 100 + 10 (k − 1) ms
    p = CostAware(gamma_max=8, verify_cost="1:100,16:250", draft_cost=0.1, prior_weight=0.01, decay=0.999)
    p.start(T1, 8)
    for i in range(400):  # every position kept with probability 0.8 (deterministic pattern)
        a = next((j for j in range(8) if (i * 7 + j * 3) % 5 == 0), 8)
        feed(p, 8, a)
    beta = p.beta()

    def rate(g):
        e, pi = 1.0, 1.0
        for b in beta[:g]:
            pi *= b
            e += pi
        return e / (g * 0.1 * 100 + curve[1] + (curve[16] - curve[1]) / 15 * g)

    assert p.next_gamma() == max(range(1, 9), key=rate)


def test_a_costly_verify_shortens_and_a_cheap_one_lengthens_the_draft():
    def chosen(verify_cost):
        p = CostAware(gamma_max=8, verify_cost=verify_cost, draft_cost=0.05)
        p.start(T1, 8)
        for _ in range(30):
            feed(p, 8, 6)
        return p.next_gamma()
    assert chosen("1:100,16:2000") < chosen("1:100,16:110")


def test_the_verify_cost_line_is_fitted_from_timings():
    """Timings from T(k) = 0.2 + 0.01 (k − 1) s at several lengths: the fit recovers the line."""
    p = CostAware(gamma_max=8, prior_weight=0.1, decay=0.999)
    p.start(T1, 8)
    for i in range(300):
        d = 1 + i % 8
        feed(p, d, 0, t_verify=0.2 + 0.01 * d, t_draft=0.03 * d)
    assert p.t_verify(0) == pytest.approx(0.2, rel=0.02) and p.t_verify(10) == pytest.approx(0.3, rel=0.02)
    assert p.t_draft() == pytest.approx(0.03, rel=1e-6)


def test_entropy_calibration_learns_which_entropies_are_kept():
    """Low-entropy drafts are always kept, high-entropy ones never: the fit maps H to acceptance, not H / log V."""
    p = CostAware(gamma_max=4, estimate="entropy", verify_cost="1:100,16:130", draft_cost=0.05, decay=0.999)
    sharp, flat = torch.tensor([0.999, 0.001, 0.0, 0.0]), torch.full((4,), 0.25)
    for i in range(100):
        p.start(T1, 4)
        p.next_gamma()
        q = [sharp, sharp, flat] if i % 2 else [sharp, flat]
        for j, qj in enumerate(q):
            p.keep_drafting(j, qj)
        kept = sum(1 for qj in q if qj is sharp)
        feed(p, len(q), kept)
    assert p.beta_h(0.01, 0.5) > 0.95 and p.beta_h(math.log(4), 0.5) < 0.05
    p.start(T1, 4)
    p.next_gamma()
    assert p.keep_drafting(0, sharp) and not p.keep_drafting(1, flat)  # a flat draft ends the round


class Recorder(DraftPolicy):
    """Wraps a policy: records every call in order, and the γ it chose before each round's verification."""

    def __init__(self, inner):
        self.inner, self.calls, self.gammas, self.stops = inner, [], [], []

    def start(self, sampling, vocab_size):
        self.calls.append(("start", sampling, vocab_size))
        self.inner.start(sampling, vocab_size)

    def next_gamma(self):
        g = self.inner.next_gamma()
        self.calls.append(("next_gamma",))
        self.gammas.append(g)
        return g

    def keep_drafting(self, i, q_i, logits_i=None):
        self.calls.append(("keep_drafting", i, q_i, logits_i))
        self.stops.append(self.inner.keep_drafting(i, q_i, logits_i))
        return self.stops[-1]

    def update(self, draft, result):
        self.calls.append(("update", draft, result))
        self.inner.update(draft, result)

    def observe_costs(self, draft, t_draft, t_verify, t_other):
        self.calls.append(("observe_costs", draft, t_draft, t_verify, t_other))
        self.inner.observe_costs(draft, t_draft, t_verify, t_other)

    def record(self):
        return self.inner.record()


@pytest.mark.parametrize("estimate", ["position", "entropy"])
def test_choices_use_only_what_was_known_before_the_round(estimate):
    """A real generation with the controller timing itself; then a fresh controller is replayed the same calls up to
    each round (what had happened before that round's verification) and must choose the same γ and the same stops.
    The controller never drafts more than gamma_max, nor past the budget."""
    target, drafter = noisy_pair()
    rec = Recorder(make_policy("cost", gamma_max=5, estimate=estimate))
    out = verispec.generate(target, [3, 1, 4, 1, 5], drafter=drafter, policy=rec, max_new_tokens=40, sampling=T1)
    assert all(1 <= s.drafted <= 5 for s in out.stats.steps[:-1])
    left = 40
    for s in out.stats.steps:
        assert s.drafted <= left - 1
        left -= s.emitted
    replay = make_policy("cost", gamma_max=5, estimate=estimate)
    gammas, stops = [], []
    for call in rec.calls:
        if call[0] == "next_gamma":
            gammas.append(replay.next_gamma())
        elif call[0] == "keep_drafting":
            stops.append(replay.keep_drafting(*call[1:]))
        else:
            getattr(replay, call[0])(*call[1:])
    assert gammas == rec.gammas and stops == rec.stops
    assert len(set(rec.gammas)) > 1 or estimate == "entropy"


def test_the_controller_keeps_what_it_learned_across_generations():
    target, drafter = noisy_pair()
    p = make_policy("cost", gamma_max=6)
    for _ in range(2):
        verispec.generate(target, [3, 1, 4, 1, 5], drafter=drafter, policy=p, max_new_tokens=16)
    assert p.pos.s[0] > 10  # the second generation started from the first one's counts


@pytest.mark.parametrize("kw,match", [({"estimate": "oracle"}, "estimate must be"),
                                      ({"verify_cost": "8:10"}, "k = 1"), ({"verify_cost": "1:x"}, "verify_cost"),
                                      ({"decay": 0}, "decay"), ({"draft_cost": 2}, "draft_cost"),
                                      ({"gamma_max": 0}, "gamma_max")])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        CostAware(**kw)
