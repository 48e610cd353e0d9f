"""The shared training loop (`verispec.training`): per-parameter learning-rate scales."""

from __future__ import annotations

import torch
from torch import nn

from verispec.training import train


def test_lr_scale_gives_a_parameter_its_own_rate():
    """Two parameters with the same gradient: one marked lr_scale = 10 moves ten times as far in an Adam step."""
    m = nn.Module()
    m.a = nn.Parameter(torch.zeros(3))
    m.b = nn.Parameter(torch.zeros(3))
    m.b.lr_scale = 10.0
    train(m, lambda step: (1, ), lambda model: (model.a.sum() + model.b.sum()), steps=1, lr=1e-2, progress=False)
    torch.testing.assert_close(m.b.detach(), 10 * m.a.detach())
    assert float(m.a.detach()[0]) < 0
