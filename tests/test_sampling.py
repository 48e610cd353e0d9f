"""`sampling.sample`: one draw by inverting the CDF — exact law, zero-mass ids never drawn, seeded, deterministic."""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats

from verispec.allocator import NO_MALLOPT_ENV, tune_allocator
from verispec.sampling import sample


def test_one_hot_gives_its_token():
    for i in (0, 7, 151_935):
        p = torch.zeros(151_936)
        p[i] = 1.0
        assert sample(p, torch.Generator().manual_seed(i)) == i


def test_draws_follow_the_distribution_and_skip_zero_mass():
    p = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.2, 0.1, 0.0])  # zeros at both ends and inside
    g = torch.Generator().manual_seed(0)
    n = 20_000
    counts = np.bincount([sample(p, g) for _ in range(n)], minlength=7)
    assert counts[[0, 2, 6]].sum() == 0
    keep = p.numpy() > 0
    expected = n * p.double().numpy()[keep]
    assert stats.chisquare(counts[keep], expected).pvalue > 1e-4
    # the same test rejects counts that land on the wrong ids (rotated among the kept ones)
    assert stats.chisquare(np.roll(counts[keep], 1), expected).pvalue < 1e-6


def test_unnormalised_mass_and_seeding():
    p = torch.tensor([2.0, 6.0, 0.0, 2.0])  # total 10: the draw scales u by the total
    g = torch.Generator().manual_seed(1)
    draws = [sample(p, g) for _ in range(4000)]
    assert 2 not in draws and abs(draws.count(1) / 4000 - 0.6) < 0.05
    a = [sample(p, torch.Generator().manual_seed(5)) for _ in range(3)]
    assert a == [sample(p, torch.Generator().manual_seed(5)) for _ in range(3)]


def test_allocator_tuning_can_be_switched_off(monkeypatch):
    monkeypatch.setenv(NO_MALLOPT_ENV, "1")
    assert tune_allocator() is False
    monkeypatch.delenv(NO_MALLOPT_ENV)
    assert isinstance(tune_allocator(), bool)  # True on glibc; False where mallopt does not exist
