"""Benchmark peers run as their users run them and sample exactly verispec's distribution."""

from __future__ import annotations

import json

import pytest

from verispec.backends import resolve_backend
from verispec.bench.peers import check_processors, expected_processors, generation_config, prepare
from verispec.bench.runner import run_bench
from verispec.models import LoadedModel
from verispec.sampling import Sampling
from tests.conftest import tiny_llama

SAMPLINGS = [Sampling(), Sampling(temperature=0.7), Sampling(temperature=1.0, top_k=5),
             Sampling(temperature=0.5, top_k=3, top_p=0.9), Sampling(temperature=1.0, top_p=0.8)]


def qwen_like():
    """A model whose own generation defaults add filters, as Qwen2.5's generation_config.json does."""
    m = tiny_llama(64, seed=1)
    g = m.generation_config
    g.repetition_penalty, g.top_k, g.top_p, g.temperature, g.do_sample = 1.1, 20, 0.8, 0.7, True
    return m


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=lambda s: s.describe())
def test_the_peer_samples_with_exactly_verispecs_filters(sampling):
    cfg = generation_config(sampling, frozenset({3}), 16, "hf-ar", {})
    if not sampling.greedy:
        assert cfg.top_k == sampling.top_k  # 0 when off: a None would become transformers' default of 50
    m = qwen_like()
    if not sampling.greedy:  # the model's own defaults would change the distribution: refused, not ignored
        with pytest.raises(ValueError, match="RepetitionPenaltyLogitsProcessor"):
            check_processors(m, cfg, 5, sampling)
    prepare(LoadedModel(m))
    assert check_processors(m, cfg, 5, sampling) == expected_processors(sampling)


def test_peer_options_reach_transformers():
    cfg = generation_config(Sampling(), frozenset({3}), 8, "hf-assisted", {"gamma": 3})
    assert cfg.num_assistant_tokens == 3 and cfg.num_assistant_tokens_schedule == "constant"
    assert generation_config(Sampling(), frozenset(), 8, "hf-pld", {"num_tokens": 7}).prompt_lookup_num_tokens == 7


def test_peers_run_on_plain_transformers_copies(folders):
    """Old code ran HF's generate on the target *after* verispec converted it to its own oneDNN layers, a speed no
    HF user gets; `kernels=verispec` keeps that as a labelled variant."""
    out = folders / "peers"
    run_bench(str(folders / "t"), str(folders / "d"), "hf-ar,hf-assisted,hf-ar:kernels=verispec",
              str(folders / "p.jsonl"), num_prompts=1, max_new_tokens=6, out_dir=out, cost_model=False,
              progress=False, warmup=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["backends"]["peers"] == {"target": "torch", "drafter": "torch"}
    ours = resolve_backend("auto")  # "fast" where oneDNN is available
    assert cfg["backends"]["target"] == ours and cfg["backends"]["kernels"]["target"]
    rows = {r["method"]: r for r in map(json.loads, (out / "prompts.jsonl").read_text().splitlines())}
    assert rows["hf-ar"]["backend"] == rows["hf-assisted"]["backend"] == "torch"
    assert rows["ar"]["backend"] == rows["hf-ar:kernels=verispec"]["backend"] == ours
    assert rows["hf-ar"]["token_ids"] == rows["ar"]["token_ids"] == rows["hf-assisted"]["token_ids"]
