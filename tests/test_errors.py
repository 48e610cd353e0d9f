"""Bad input gets a clear error (and nothing half-done)."""

from __future__ import annotations

import pytest

import verispec
from verispec import Sampling
from verispec.models import LoadedModel, ModelNotFoundError, TokenizerMismatchError, check_compatible
from verispec.policies import FixedGamma
from tests.conftest import tiny_llama, word_tokenizer


def test_mismatched_tokenizers_are_refused(pair):
    target, drafter = pair
    other = LoadedModel(drafter.model, word_tokenizer(["<unk>"] + [f"x{i}" for i in range(63)]), "other")
    with pytest.raises(TokenizerMismatchError, match="differ"):
        verispec.generate(target, [1, 2], drafter=other)
    with pytest.raises(TokenizerMismatchError):
        check_compatible(target, other)


def test_a_pair_checked_once_is_checked_again_when_a_tokenizer_grows(pair):
    """generate() checks its pair on every call; a pair found compatible is remembered, but not past a change."""
    target, drafter = pair
    check_compatible(target, drafter)
    check_compatible(target, drafter)  # remembered
    words = ["<unk>"] + [f"w{i}" for i in range(63)]
    tok = word_tokenizer(words)
    a, b = LoadedModel(target.model, tok, "a"), LoadedModel(drafter.model, word_tokenizer(words), "b")
    check_compatible(a, b)
    tok.add_tokens(["brand-new"])
    with pytest.raises(TokenizerMismatchError, match="1 tokens only in the target"):
        check_compatible(a, b)


def test_mismatched_vocab_sizes_without_tokenizers_are_refused():
    with pytest.raises(TokenizerMismatchError, match="output tokens"):
        verispec.generate(tiny_llama(64), [1, 2], drafter=tiny_llama(48))


@pytest.mark.parametrize("prompt", ["", [], "   "])
def test_empty_prompt(pair, prompt):
    target, _ = pair
    with pytest.raises(ValueError, match="empty"):
        verispec.generate(target, prompt)


def test_overlong_prompt(pair):
    target, _ = pair
    with pytest.raises(ValueError, match="context"):
        verispec.generate(target, [1] * 500, max_new_tokens=20)


def test_out_of_vocabulary_prompt_ids(pair):
    with pytest.raises(ValueError, match="token ids"):
        verispec.generate(pair[0], [1, 64])


@pytest.mark.parametrize("n", [0, -1, 2.5])
def test_bad_max_new_tokens(pair, n):
    with pytest.raises(ValueError, match="max_new_tokens"):
        verispec.generate(pair[0], [1, 2], max_new_tokens=n)


@pytest.mark.parametrize("gamma", [0, -3, 1.5])
def test_bad_gamma(pair, gamma):
    with pytest.raises(ValueError, match="gamma"):
        verispec.generate(pair[0], [1, 2], drafter=pair[1], gamma=gamma)
    with pytest.raises(ValueError, match="gamma"):
        FixedGamma(gamma)


@pytest.mark.parametrize("kw,match", [({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"),
                                      ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k")])
def test_bad_sampling(kw, match):
    with pytest.raises(ValueError, match=match):
        Sampling(**kw)


def test_unknown_model_and_method(pair):
    with pytest.raises(ModelNotFoundError, match="unknown model 'no-such-model'"):
        verispec.generate("no-such-model", "hi")
    with pytest.raises(ValueError, match="unknown method"):
        verispec.generate(pair[0], [1], method="nope")
    with pytest.raises(ValueError, match="needs a drafter"):
        verispec.generate(pair[0], [1], method="sd")


def test_bad_num_beams(pair):
    with pytest.raises(ValueError, match="num_beams"):
        verispec.generate(pair[0], [1, 2], method="beam", num_beams=0)
