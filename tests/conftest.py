"""Tiny randomly initialised transformers models, built in-process (fast, offline)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers

from verispec.models import LoadedModel

# Tiny models are dominated by per-op overhead; a second intra-op thread makes them ~4x slower.
torch.set_num_threads(1)


def tiny_llama(vocab: int = 64, seed: int = 0, layers: int = 2, hidden: int = 32, scale: float = 1.0,
               eos: int | None = None) -> LlamaForCausalLM:
    """A random Llama; `scale` multiplies the output layer so the distributions are peaked (scale > 1)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=eos, bos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(scale)
    return m


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=words[0])


@pytest.fixture
def pair():
    """A target and a smaller random drafter over the same 64-token vocabulary."""
    words = ["<unk>"] + [f"w{i}" for i in range(63)]
    tok = word_tokenizer(words)
    target = LoadedModel(tiny_llama(64, seed=1, scale=20.0), tok, "tiny-target")
    drafter = LoadedModel(tiny_llama(64, seed=2, layers=1, hidden=16, scale=20.0), tok, "tiny-drafter")
    return target, drafter


@pytest.fixture
def folders(tmp_path):
    """Saved tiny target / drafter folders (the drafter a noisy copy of the target) and a 4-prompt .jsonl."""
    tok = word_tokenizer(["<unk>"] + [f"w{i}" for i in range(63)])
    t = tiny_llama(64, seed=1, scale=8.0)
    d = copy.deepcopy(t)
    with torch.no_grad():
        d.lm_head.weight.add_(torch.randn(d.lm_head.weight.shape, generator=torch.Generator().manual_seed(3)))
    for name, m in (("t", t), ("d", d)):
        m.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    data = tmp_path / "p.jsonl"
    data.write_text("\n".join(json.dumps({"id": i, "prompt": " ".join(f"w{(i * 7 + j) % 60}" for j in range(6)),
                                          "category": "ab"[i % 2], "reference": "w1 w2"}) for i in range(4)))
    return tmp_path
