"""`sampling.sample`: one draw by inverting the CDF — exact law, zero-mass ids never drawn, seeded, deterministic.
`Sampling.probs`: equal to an independent numpy transform (tests/law.py), ties and top-p boundaries included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from verispec.allocator import NO_MALLOPT_ENV, tune_allocator
from verispec.sampling import Sampling, argmax_rows, sample


def test_one_hot_gives_its_token():
    for i in (0, 7, 151_935):
        p = torch.zeros(151_936)
        p[i] = 1.0
        assert sample(p, torch.Generator().manual_seed(i)) == i


def test_a_one_hot_draw_uses_the_generator_as_any_draw_does():
    """The one-hot shortcut still takes its uniform: the stream's later draws do not depend on the shortcut."""
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    one_hot, spread = torch.zeros(1000), torch.full((1000,), 1e-3)
    one_hot[3] = 2.0  # unnormalised mass too
    assert sample(one_hot, g1) == 3
    sample(spread, g2)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_argmax_rows_is_torch_argmax_with_ties():
    x = torch.tensor([[1.0, 3.0, 3.0], [-2.0, -2.0, -5.0], [0.0, 0.0, 0.0]])  # (3, 3)
    assert argmax_rows(x).tolist() == x.argmax(-1).tolist() == [1, 0, 0]
    y = torch.randn(4, 151_936, generator=torch.Generator().manual_seed(0))
    assert torch.equal(argmax_rows(y), y.argmax(-1)) and argmax_rows(y).dtype == torch.int64
    assert torch.equal(argmax_rows(y[:, ::2]), y[:, ::2].argmax(-1))  # a strided view


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


# --- Sampling.probs against tests/law.py's numpy transform, written from HF's definitions ---------------------------

def _compare(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> None:
    from tests.law import probs

    got = Sampling(temperature, top_k, top_p).probs(logits).double().numpy()  # (N, V)
    want = probs(logits.numpy(), temperature, top_k, top_p)  # (N, V)
    assert np.array_equal(got > 0, want > 0), (temperature, top_k, top_p)  # the same support, token for token
    assert np.allclose(got, want, atol=1e-6, rtol=0), (temperature, top_k, top_p)


@pytest.mark.parametrize("temperature", [0.0, 0.5, 1.0, 1.7])
@pytest.mark.parametrize("top_k", [0, 1, 3, 12, 40])
@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.5, 0.05])
def test_probs_equal_the_reference_transform_on_random_logits(temperature, top_k, top_p):
    logits = torch.randn(64, 24, generator=torch.Generator().manual_seed(top_k)) * 3  # (N, V) no ties
    _compare(logits, temperature, top_k, top_p)


@pytest.mark.parametrize("temperature", [0.0, 0.5, 1.0, 1.7])
@pytest.mark.parametrize("top_k", [0, 2, 3, 5])
@pytest.mark.parametrize("top_p", [1.0, 0.8, 0.45])
def test_probs_equal_the_reference_transform_with_tied_logits(temperature, top_k, top_p):
    """Integer logits over 10 tokens: ties everywhere, at the top-k boundary (all tied tokens are kept), inside the
    top-p boundary (the stable ascending sort removes the lower id first, as torch's CPU sort does for V <= 16) and
    at the greedy argmax (the first one wins)."""
    from tests.law import warp

    g = torch.Generator().manual_seed(7)
    logits = torch.randint(-2, 3, (200, 10), generator=g).float()  # (N, V)
    if temperature and top_p < 1:
        margins = [warp(row[None], temperature, top_k, top_p)[1] for row in logits.double().numpy()]
        logits = logits[torch.tensor(margins) > 1e-6]  # rows where fp32 rounding could flip a token are no tie test
        assert len(logits) > 100
        kept = Sampling(temperature, top_k, top_p).probs(logits) > 0  # (N, V)
        tied = logits[:, :, None] == logits[:, None, :]  # (N, V, V)
        assert (tied & (kept[:, :, None] != kept[:, None, :])).any()  # top-p kept one of two equal logits
    kept = (Sampling(temperature or 1.0, top_k).probs(logits) > 0).sum(-1)  # (N,)
    if top_k and temperature:
        assert (kept > top_k).any()  # ties at the k-th logit were kept, beyond k tokens
    _compare(logits, temperature, top_k, top_p)


@pytest.mark.parametrize("logits,top_k,top_p,keep", [
    ([0, 0, 0, 0], 0, 0.75, [0, 1, 1, 1]), ([0, 0, 0, 0], 0, 0.5, [0, 0, 1, 1]), ([0, 0, 0, 0], 0, 0.25, [0, 0, 0, 1]),
    ([0, 0, -1, 0, 0], 4, 0.5, [0, 0, 0, 1, 1]),  # top-k drops id 2 first: quarters again
    ([-1, 0, 0, 0], 3, 0.7, [0, 1, 1, 1])])  # thirds: 1/3 > 0.3, nothing more goes
def test_top_p_at_exactly_representable_boundaries(logits, top_k, top_p, keep):
    """Equal logits: the cumulative probabilities 0.25, 0.5, 0.75, 1 hit 1 - top_p exactly (in fp32 and fp64);
    `c <= 1 - top_p` removes those tokens, the lowest ids first."""
    logits = torch.tensor([logits], dtype=torch.float32)  # (1, V)
    got = Sampling(1.0, top_k, top_p).probs(logits)[0]
    assert (got > 0).int().tolist() == keep
    _compare(logits, 1.0, top_k, top_p)


def test_greedy_is_the_first_argmax():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [-1.0, -1.0, -2.0, -1.0]])  # (2, 4)
    assert Sampling().probs(logits).argmax(-1).tolist() == [1, 0]
    _compare(logits, 0.0, 0, 1.0)
