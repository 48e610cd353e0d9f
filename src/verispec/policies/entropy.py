"""Entropy of a drafter distribution, normalised by log V (shared by the entropy-based policies)."""

from __future__ import annotations

import math

import torch

from verispec.sampling import Sampling


def entropy(p: torch.Tensor) -> float:
    """H = −Σ p log p in nats for a (V,) distribution (0 log 0 = 0)."""
    p = p.float()
    nz = p[p > 0]
    return float(-(nz * nz.log()).sum())


def drafter_distribution(q_i: torch.Tensor | None, logits_i: torch.Tensor | None, sampling: Sampling | None,
                         consistent: bool) -> torch.Tensor | None:
    """The distribution whose uncertainty a policy should read.

    consistent=True: the distribution actually sampled from (temperature, top-k, top-p applied), so entropy is
    measured at the temperature in use. Greedy decoding samples from a one-hot (zero entropy at any position), so
    there, and whenever consistent=False, the drafter's raw softmax at temperature 1 is used instead.
    """
    if consistent and q_i is not None and sampling is not None and not sampling.greedy:
        return q_i
    if logits_i is not None:
        return torch.softmax(logits_i.float(), dim=-1)
    return q_i


def normalised_entropy(p: torch.Tensor, vocab_size: int) -> float:
    """H_norm = H / log V in [0, 1]."""
    return entropy(p) / math.log(vocab_size) if vocab_size > 1 else 0.0
