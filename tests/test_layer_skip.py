"""Layer-skip self-speculation (`verispec.drafters.layer_skip`): the drafter is the target's own modules (no copy,
resident memory checked), its skip set comes from the option, block influence or the offline search, the search's
cache round-trips and a corrupted one is refused. (Greedy equality and χ² run through the contract suite.)"""

from __future__ import annotations

import json

import psutil
import pytest
import torch

import verispec
from verispec.drafters import layer_skip
from verispec.drafters.layer_skip import LayerSkipDrafter, block_influence, lowest_bi, parse_skip, search_skip_set
from verispec.policies import FixedGamma
from verispec.sampling import Sampling
from tests.conftest import tiny_llama
from tests.test_contract import GREEDY_PROMPT


@pytest.fixture(scope="module")
def target():
    return tiny_llama(64, seed=1, scale=20.0, layers=4)


def test_drafter_shares_the_targets_weights(target):
    d = LayerSkipDrafter(target, 64, skip="1,2")
    kept = d.lm.lean.layers
    body = target.get_decoder()
    assert kept == [body.layers[0], body.layers[3]] and all(a is b for a, b in zip(kept, [body.layers[0],
                                                                                          body.layers[3]]))
    assert d.lm.model is target
    ptrs = {p.data_ptr() for p in target.parameters()}
    assert {p.data_ptr() for layer in kept for p in layer.parameters()} <= ptrs


def test_resident_memory_grows_by_no_model_copy():
    big = tiny_llama(4096, seed=3, layers=4, hidden=512)  # ~40 MB of weights
    size = sum(p.numel() * p.element_size() for p in big.parameters())
    rss = psutil.Process().memory_info().rss
    drafters = [LayerSkipDrafter(big, 4096, skip="1") for _ in range(3)]
    for d in drafters:
        d.prefill([1, 2, 3])
        d.propose([1, 2, 3], 2, FixedGamma(2), Sampling(), None)
    grown = psutil.Process().memory_info().rss - rss
    assert grown < 0.5 * size, f"three drafters grew resident memory by {grown / 2**20:.1f} MiB (model {size / 2**20:.1f})"


def test_skipped_layers_change_the_drafts_logits(target):
    from verispec.cache import CachedLM

    full = CachedLM(target, lean=True).forward(GREEDY_PROMPT)
    d = LayerSkipDrafter(target, 64, skip="2")
    d.lm.reset()
    assert not torch.allclose(d.lm.forward(GREEDY_PROMPT), full)
    d.lm.lean = layer_skip.skip_view(d.full, [0, 1, 2, 3])  # keeping every layer is the target again
    d.lm.reset()
    torch.testing.assert_close(d.lm.forward(GREEDY_PROMPT), full)


def test_prefill_runs_the_kept_layers_only(target):
    """The drafter's cache after prefill is the one its own (skipped) forward writes: the next step's logits equal
    those of one forward of the whole sequence through the kept layers."""
    from verispec.cache import CachedLM

    d = LayerSkipDrafter(target, 64, skip="1,2")
    d.prefill(GREEDY_PROMPT)
    step = d.lm.forward(GREEDY_PROMPT)  # (1, V): the pending token on the prefilled cache
    whole = CachedLM(target, lean=True)
    whole.lean = layer_skip.skip_view(whole.lean, [0, 3])
    torch.testing.assert_close(step, whole.forward(GREEDY_PROMPT))


def test_block_influence_picks_inner_layers_once_per_target(target):
    bi = block_influence(target, GREEDY_PROMPT)
    assert len(bi) == 4 and all(0 <= b <= 2 for b in bi)
    s = lowest_bi(bi, 0.5)
    assert 0 not in s and 3 not in s and len(s) == 2
    d = LayerSkipDrafter(target, 64, skip="bi", ratio=0.5)
    d.prefill(GREEDY_PROMPT)
    assert d.skip == s
    d2 = LayerSkipDrafter(target, 64, skip="bi", ratio=0.5)
    d2.prefill([5, 6, 7])  # another prompt: the set found on the first one is kept
    assert d2.skip == s


@pytest.mark.parametrize("skip", ["0,1,2,3", "7", "a,b", "", [-1]])
def test_bad_skip_sets_are_refused(skip):
    with pytest.raises(ValueError, match="skip must be"):
        parse_skip(skip, 4)


def test_search_caches_a_set_that_auto_uses(target, tmp_path, monkeypatch):
    monkeypatch.setenv("VERISPEC_HOME", str(tmp_path))
    record = search_skip_set(target, GREEDY_PROMPT * 3, max_ratio=0.5, pool=2, progress=lambda line: None)
    assert record["path"] and 1 <= len(record["skip"]) <= 2 and 0 not in record["skip"]
    assert record["skip"] == max(record["path"], key=lambda r: r["speedup"])["skip"]
    path = layer_skip.save_searched("tiny", target, record)
    d = LayerSkipDrafter(target, 64, target_name="tiny")
    assert d.mode == "searched" and d.skip == record["skip"]
    assert LayerSkipDrafter(target, 64, target_name="other").mode == "bi"  # another target's name: not used
    path.write_text("{not json")
    with pytest.raises(ValueError, match="corrupted"):
        LayerSkipDrafter(target, 64, target_name="tiny")
    path.write_text(json.dumps({"skip": [9]}))
    with pytest.raises(ValueError, match="skip must be"):
        LayerSkipDrafter(target, 64, target_name="tiny")


def test_greedy_equality_on_a_deeper_target(target):
    ar = verispec.generate(target, GREEDY_PROMPT, method="ar", max_new_tokens=40).token_ids
    for skip in ("1", "1,2", "bi"):
        out = verispec.generate(target, GREEDY_PROMPT, method="layer-skip", skip=skip, gamma=4, max_new_tokens=40)
        assert out.token_ids == ar
        assert 0 < out.stats.accepted < out.stats.drafted


def test_a_model_without_verispecs_decoder_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2)).eval()
    with pytest.raises(ValueError, match="layer-skip needs"):
        LayerSkipDrafter(gpt2, 32, skip="1")
