"""Draft-length policies: their arithmetic, and losslessness under every one of them."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import verispec
from verispec.cache import CachedLM
from verispec.drafters.draft_model import DraftModelDrafter
from verispec.engine import decode
from verispec.policies import AdaEDL, Confidence, EGAG, Heuristic, make_policy
from verispec.registry import POLICIES
from verispec.policies.entropy import normalised_entropy
from verispec.sampling import Sampling
from verispec.types import Draft, VerifyResult
from verispec.verifiers import RejectionVerifier
from tests.conftest import tiny_llama
from tests.test_distribution import PROMPT, V, chi2_pvalue, exact_two_token_law, models

GREEDY = Sampling()
T1 = Sampling(temperature=1.0)

ALL = [("fixed", {}), ("egag", {}), ("egag", {"mode": "token", "threshold": 0.05}), ("egag", {"ema": 0.8}),
       ("heuristic", {}), ("confidence", {"threshold": 0.9}), ("adaedl", {})]


def uniform(v=16):
    return torch.full((v,), 1.0 / v)


def onehot(v=16, i=0):
    p = torch.zeros(v)
    p[i] = 1
    return p


def test_egag_gamma_from_normalised_entropy():
    pol = EGAG(gamma_max=8, gamma_min=2)
    pol.start(T1, 16)
    assert pol.gamma_from(0.0) == 8 and pol.gamma_from(1.0) == 2 and pol.gamma_from(0.5) == 4
    assert pol.gamma_from(0.99) == 2  # clamped to gamma_min
    assert normalised_entropy(uniform(), 16) == pytest.approx(1.0) and normalised_entropy(onehot(), 16) == 0
    # A block whose first draft distribution is certain runs to gamma_max; an uncertain one stops at gamma_min.
    assert all(pol.keep_drafting(i, onehot()) for i in range(7)) and not pol.keep_drafting(7, onehot())
    assert pol.record()["gamma"] == 8
    assert pol.keep_drafting(0, uniform()) and not pol.keep_drafting(1, onehot())
    assert pol.record() == {"h_norm": pytest.approx(1.0), "h_used": pytest.approx(1.0), "gamma": 2}


def test_egag_ema_and_temperature_consistency():
    pol = EGAG(gamma_max=10, ema=0.5)
    pol.start(T1, 16)
    pol.keep_drafting(0, onehot())  # H = 0
    pol.keep_drafting(0, uniform())  # H̄ = 0.5 * 0 + 0.5 * 1
    assert pol.record()["h_used"] == pytest.approx(0.5) and pol.gamma_block == 5
    logits = torch.zeros(16)  # raw drafter logits: uniform at T = 1
    for consistent, expect in ((True, 0.0), (False, 1.0)):
        p = EGAG(consistent=consistent)
        p.start(Sampling(temperature=0.5), 16)
        p.keep_drafting(0, onehot(), logits)  # the sampled distribution (at T=0.5) is certain, the raw one is not
        assert p.record()["h_norm"] == pytest.approx(expect)
    g = EGAG(consistent=True)
    g.start(GREEDY, 16)  # greedy samples from one-hot: entropy is read from the raw logits
    g.keep_drafting(0, onehot(), logits)
    assert g.record()["h_norm"] == pytest.approx(1.0)


def test_egag_per_token_mode():
    pol = EGAG(gamma_max=6, mode="token", threshold=0.5)
    pol.start(T1, 16)
    assert pol.keep_drafting(0, onehot()) and pol.keep_drafting(1, onehot())
    assert not pol.keep_drafting(2, uniform())  # the third token crossed the threshold
    assert pol.record()["gamma"] == 3


def test_heuristic_schedule():
    pol = Heuristic(gamma=4)
    pol.start(GREEDY, 16)
    pol.update(Draft([1] * 4), VerifyResult(4, 0, "bonus"))
    assert pol.next_gamma() == 6
    pol.update(Draft([1] * 6), VerifyResult(2, 0, "recovered"))
    assert pol.next_gamma() == 5
    for _ in range(10):
        pol.update(Draft([1]), VerifyResult(0, 0, "recovered"))
    assert pol.next_gamma() == 1


def test_confidence_and_adaedl_stopping():
    c = Confidence(threshold=0.5)
    c.start(T1, 16)
    assert c.keep_drafting(0, onehot()) and not c.keep_drafting(0, uniform())
    a = AdaEDL(lam=0.3, eps=0.5, margin=0.1, ema=0.0)
    a.start(T1, 16)
    assert a.keep_drafting(0, onehot())  # β̂ = 1
    assert not a.keep_drafting(0, uniform())  # β̂ = 1 − sqrt(0.3 · ln 16) < 0.5
    a.update(Draft([1] * 4), VerifyResult(1, 0, "recovered"))  # acceptance 0.25 -> ε = 0.15
    assert a.eps == pytest.approx(0.15)
    assert a.keep_drafting(0, uniform()) == (1 - math.sqrt(0.3 * math.log(16)) >= 0.15)


@pytest.mark.parametrize("name,kw", [("egag", {"gamma_max": 0}), ("egag", {"gamma_min": 5, "gamma_max": 3}),
                                     ("egag", {"mode": "x"}), ("egag", {"ema": 1.0}), ("heuristic", {"gamma": 0}),
                                     ("confidence", {"threshold": 1.5}), ("adaedl", {"lam": 0}), ("nope", {})])
def test_bad_policy_options(name, kw):
    with pytest.raises(ValueError):
        make_policy(name, **kw)


def noisy_pair():
    target = tiny_llama(64, seed=1, scale=20.0)
    drafter = copy.deepcopy(target)
    with torch.no_grad():
        drafter.lm_head.weight.add_(torch.randn(drafter.lm_head.weight.shape,
                                                generator=torch.Generator().manual_seed(4)) * 0.6)
    return target, drafter


@pytest.mark.parametrize("name,kw", ALL, ids=lambda x: x if isinstance(x, str) else str(x))
def test_greedy_equality_under_every_policy(name, kw):
    target, drafter = noisy_pair()
    ar = verispec.generate(target, [3, 1, 4, 1, 5], max_new_tokens=48).token_ids
    out = verispec.generate(target, [3, 1, 4, 1, 5], drafter=drafter, policy=name, gamma=6, max_new_tokens=48, **kw)
    assert out.token_ids == ar
    assert 0 < out.stats.accepted < out.stats.drafted  # drafts were both kept and rejected


@pytest.mark.parametrize("name,kw", ALL, ids=lambda x: x if isinstance(x, str) else str(x))
def test_sampling_distribution_under_every_policy(name, kw):
    target, drafter_model = models()
    s = Sampling(temperature=1.0, seed=5)
    lm, drafter = CachedLM(target), DraftModelDrafter(drafter_model, V)
    g = torch.Generator().manual_seed(5)
    counts = np.zeros(V * V)
    for _ in range(5000):
        ids, _ = decode(lm, drafter, RejectionVerifier(), make_policy(name, **kw), PROMPT, max_new_tokens=2,
                        sampling=s, stop_ids=frozenset(), method=name, generator=g)
        counts[ids[0] * V + ids[1]] += 1
    assert chi2_pvalue(counts, exact_two_token_law(target, s)) > 1e-3


def test_registry_complete():
    assert set(POLICIES) == {"fixed", "egag", "heuristic", "confidence", "adaedl"}


def test_egag_experiment_runs_end_to_end_on_tiny_models(tmp_path):
    """The one-command study, shrunk: every part of the report is produced from real runs."""
    import json

    from tests.conftest import word_tokenizer
    from verispec.experiments import egag

    target, drafter = noisy_pair()
    tok = word_tokenizer(["<unk>"] + [f"w{i}" for i in range(63)])
    for name, m in (("t", target), ("d", drafter)):
        m.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"id": "a", "prompt": "w1 w2 w3 w1 w2"}) + "\n")
    res = egag.run(tmp_path / "out", str(tmp_path / "t"), str(tmp_path / "d"), str(data), 1, 8,
                   ["greedy", "T=1.0"], progress=False)
    md = (tmp_path / "out" / "egag.md").read_text()
    for part in ("Main table — greedy", "Main table — T=1.0", "γ_max sweep", "Ablations", "EGAG (γ_max = 8) vs"):
        assert part in md
    assert (tmp_path / "out" / "plots" / "trace.png").is_file()
    greedy = res["conditions"]["greedy"]["groups"]["overall"]
    assert all(r["exact_match_ar"] == 1.0 for r in greedy.values())  # every policy stayed lossless
