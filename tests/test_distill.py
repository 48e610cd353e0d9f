"""The self-distillation feature store: the target's own completions of corpus prompts, with the features AR
decoding computed, equal to those of one plain forward; incomplete or inconsistent stores are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import tiny_llama, word_tokenizer
from verispec.cache import CachedLM
from verispec.distill import STORE_FILE, build_store, load_sequences, open_store
from verispec.models import LoadedModel


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    words = ["<unk>"] + [w for w in "def return self import class if else for in None the of a to".split()]
    target = LoadedModel(tiny_llama(len(words), seed=1), word_tokenizer(words), "tiny")
    path = tmp_path_factory.mktemp("store") / "s"
    return target, build_store(target, path, ("final", 1), prompts=3, prompt_len=16, completion_len=5,
                               sampled_share=0.5)


def test_store_holds_prompt_completion_and_the_features_of_a_plain_forward(built):
    target, info = built
    assert info.spec == ("final", 1) and info.width == 2 * 32 and len(info.shards) == 3
    for tokens, feats in load_sequences(info):
        assert len(tokens) == 16 + 5 - 1  # the newest token was never fed
        lm = CachedLM(target.model)
        lm.track_features(("final", 1))
        lm.prefill([int(t) for t in tokens])
        np.testing.assert_allclose(feats.astype(np.float32), lm.features.numpy(), atol=2e-3, rtol=2e-3)  # fp16


def test_incomplete_existing_and_inconsistent_stores_are_refused(built, tmp_path):
    target, info = built
    with pytest.raises(ValueError, match="already holds"):
        build_store(target, info.path, prompts=1)
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError, match="not a complete feature store"):
        open_store(tmp_path / "x")
    meta = json.loads((info.path / STORE_FILE).read_text())
    meta["shards"][0]["tokens"] += 1
    (tmp_path / "y").mkdir()
    for f in info.path.iterdir():
        (tmp_path / "y" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "y" / STORE_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match"):
        load_sequences(open_store(tmp_path / "y"))
    (tmp_path / "y" / f"{meta['shards'][1]['file']}.features.npy").unlink()
    with pytest.raises(ValueError, match="lacks shard"):
        open_store(tmp_path / "y")


def test_the_store_corpus_leaves_out_the_files_the_benchmark_reads(monkeypatch):
    """The nl / summarize prose (module docstrings) and the code-edit functions come from standard-library files;
    prompts for training data must never be cut from those files."""
    from verispec import distill
    from verispec.bench.datasets import _DOC_MODULES, _EDIT_FILES, bench_sources
    from verispec.datastore import stdlib_dir

    held = bench_sources()
    root = stdlib_dir()
    assert (root / "argparse.py").resolve() in held and (root / "json" / "__init__.py").resolve() in held
    assert (root / _EDIT_FILES[0]).resolve() in held and len(held) >= len(_DOC_MODULES)
    read = []
    import verispec.datastore as ds

    orig = ds._read_text
    monkeypatch.setattr(ds, "_read_text", lambda p: read.append(p.resolve()) or orig(p))

    class Tok:  # one id per character: windows of `length` ids are `length` characters
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 1000 for c in text]}

    got = distill.corpus_prompts(Tok(), 40, 64, seed=3)
    assert len(got) == 40
    assert read and not set(read) & held
