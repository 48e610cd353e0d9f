"""Blockwise parallel decoding: proposal heads start as the identity, learn a toy pattern, draft chains (never
trees), and round-trip through their drafter folder."""

from __future__ import annotations

import pytest
import torch

import verispec
from tests.test_medusa import pattern_world
from verispec.drafters import blockwise
from verispec.drafters.blockwise import BlockwiseHeads
from verispec.drafters.folder import load_drafter


def test_untrained_heads_are_the_identity():
    h = BlockwiseHeads(8, 2)
    x = torch.randn(3, 8)
    for head in h.heads:
        torch.testing.assert_close(head(x), x)


def test_trained_heads_draft_accepted_chains_and_reload(tmp_path):
    target, store = pattern_world(tmp_path, own=True)
    out = blockwise.train_heads(target, store, tmp_path / "b", n_heads=3, draft_vocab=None, steps=120, batch=32,
                                lr=3e-2, progress=False)
    assert out["loss_last"] < 0.7 * out["loss_first"]
    cfg, tensors, _ = load_drafter(tmp_path / "b", "blockwise", target.model)
    assert cfg["inner_size"] == 32
    with pytest.raises(ValueError, match="holds a 'blockwise'"):
        load_drafter(tmp_path / "b", "medusa")
    prompt = [(3 * (i + 5)) % 17 + 1 for i in range(12)]  # a prompt of the store: the target's own continuation
    ar = verispec.generate(target.model, prompt, method="ar", max_new_tokens=24).token_ids
    got = verispec.generate(target, prompt, method="blockwise", heads=str(tmp_path / "b"), max_new_tokens=24, gamma=3)
    assert got.token_ids == ar and got.stats.accepted > 0
    assert all(s.nodes == s.drafted for s in got.stats.steps)  # chains: as many nodes as positions


def test_mismatched_weights_are_refused():
    h = BlockwiseHeads(8, 2)
    cfg = {**h.config(), "num_heads": 3}
    with pytest.raises(ValueError, match="do not match"):
        BlockwiseHeads.from_tensors(cfg, h.tensors())
