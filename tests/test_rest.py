"""REST (He et al. 2024): suffix array, retrieval, datastore file handling, and losslessness of the drafter."""

from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import verispec
from verispec.datastore import (SEP, Datastore, DatastoreError, DatastoreMismatchError, build_datastore,
                                build_datastore_file, corpus_files, find, suffix_array)
from verispec.datastore_cli import register
from verispec.registry import METHODS
from verispec.drafters.rest import RestDrafter
from verispec.models import LoadedModel
from verispec.policies import FixedGamma
from verispec.sampling import Sampling
from verispec.types import VerifyResult
from verispec.verifiers import RejectionVerifier
from tests.conftest import tiny_llama, word_tokenizer
from tests import law
from tests.test_distribution import PROMPT as DIST_PROMPT, V, models

PROMPT = [3, 17, 42, 5, 9]
WORDS = ["<unk>"] + [f"w{i}" for i in range(63)]  # the `pair` fixture's tokenizer: id i + 1 is "w{i}"


def brute_sa(T):
    return sorted(range(len(T)), key=lambda i: list(T[i:]))


# ------------------------------------------------------------------------------------------------ suffix array

@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(-1, 3), max_size=80))
def test_suffix_array_matches_brute_force(xs):
    T = np.array(xs, np.int32)
    assert suffix_array(T).tolist() == brute_sa(xs)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=30), st.integers(2, 6))
def test_suffix_array_with_long_repeats(block, reps):
    xs = block * reps + [SEP] + block  # repeats longer than one doubling round
    assert suffix_array(np.array(xs, np.int32)).tolist() == brute_sa(xs)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(-1, 3), max_size=60), st.lists(st.integers(0, 3), min_size=1, max_size=4))
def test_find_returns_exactly_the_occurrences(xs, pattern):
    T = np.array(xs, np.int32)
    SA = suffix_array(T)
    lo, hi = find(T, SA, pattern)
    m = len(pattern)
    assert sorted(SA[lo:hi].tolist()) == [i for i in range(len(xs)) if xs[i:i + m] == pattern]


# -------------------------------------------------------------------------------------------------- retrieval

def raw(docs, vocab=64):
    return Datastore.from_docs(docs, vocab_size=vocab)


def test_retrieval_returns_the_continuations_and_the_most_frequent_chain():
    ds = raw([[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [0, 1, 2, 3, 7, 8], [1, 2, 3, 4, 5, 9], [1, 2], [1, 2, 3]])
    r = ds.retrieve([9, 9, 1, 2], 3, max_suffix=2, min_suffix=2)
    assert (r.n, r.occurrences) == (2, 6)
    rows = sorted(map(tuple, r.continuations.tolist()))
    S = SEP
    assert rows == sorted([(3, 4, 5), (3, 4, 6), (3, 7, 8), (3, 4, 5), (S, S, S), (3, S, S)])  # cut at doc ends
    # trie: 3 (5 continuations) -> 4 (3) beats 7 (1) -> 5 (2) beats 6 (1)
    assert r.chain() == [3, 4, 5]
    # depth 4 counts only the continuations through 3, 4, 5: just [1, 2, 3, 4, 5, 9] goes on
    assert ds.retrieve([1, 2], 4, max_suffix=2).chain() == [3, 4, 5, 9]
    # per-level greedy: 8 is the most frequent first token, and the path then stays inside its subtree
    ds2 = raw([[1, 8, 10], [1, 8, 11], [1, 8, 11], [1, 3, 4], [1, 3, 4], [1, 5, 4]])
    assert ds2.retrieve([1], 2, min_suffix=1).chain() == [8, 11]


def test_retrieval_tree_keeps_the_most_frequent_nodes_parents_first():
    ds = raw([[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [0, 1, 2, 3, 7, 8], [1, 2, 3, 4, 5, 9], [1, 2], [1, 2, 3]])
    r = ds.retrieve([9, 9, 1, 2], 3, max_suffix=2, min_suffix=2)
    # counts: (3) 5, (3,4) 3, (3,4,5) 2, (3,4,6) 1, (3,7) 1, (3,7,8) 1
    assert r.tree(3, 3) == ([3, 4, 5], [-1, 0, 1])
    tokens, parents = r.tree(10, 3)
    assert sorted(zip(tokens, parents)) == sorted([(3, -1), (4, 0), (7, 0), (5, 1), (6, 1), (8, 2)])
    assert all(a < i for i, a in enumerate(parents))
    assert r.tree(10, 2) == ([3, 4, 7], [-1, 0, 0])  # cut to depth γ
    assert r.tree(10, 3, frozenset({4})) == ([3, 4, 7, 8], [-1, 0, 0, 2])  # nothing below a stop token


@pytest.mark.parametrize("gamma", [2, 4])
def test_greedy_rest_tree_equals_ar_and_keeps_branches(pair, gamma):
    target, _ = pair
    plain = ar(target, 40)
    seq = PROMPT + plain
    # each context is followed by a wrong continuation more often than by the right one: a chain takes the wrong
    # one, a tree also holds the right one
    docs = [[seq[i - 1], seq[i], (seq[i + 1] + 1) % 64, 0] for i in range(1, len(seq) - 1)] * 6
    docs += [seq[i - 1: i + 4] for i in range(1, len(seq) - 3)]
    ds = Datastore.from_docs(docs, target.tokenizer)
    kw = dict(method="rest", datastore=ds, gamma=gamma, max_new_tokens=40, max_suffix=2)
    chain = verispec.generate(target, PROMPT, **kw)
    tree = verispec.generate(target, PROMPT, tree_nodes=8, **kw)
    assert chain.token_ids == tree.token_ids == plain
    assert tree.stats.mat > chain.stats.mat + 0.3 and tree.stats.target_forwards < chain.stats.target_forwards


def test_retrieval_caps_the_occurrences_examined():
    docs = [[1, 2, 10 + (i % 5)] for i in range(100)]  # 5 continuations, 20 each
    ds = raw(docs)
    r = ds.retrieve([1, 2], 1, max_occurrences=10)
    assert r.occurrences == 100 and len(r.continuations) == 10
    assert sorted(set(r.continuations[:, 0].tolist())) == [10, 11, 12, 13, 14]  # spread over the whole range
    assert len(ds.retrieve([1, 2], 1, max_occurrences=1000).continuations) == 100


def test_longest_suffix_is_tried_first():
    docs = [[5, 6, 7, 8, 1, 2, 10, 11]] + [[3, 1, 2, 20, 21]] * 3
    ds = raw(docs)
    r = ds.retrieve([9, 6, 7, 8, 1, 2], 2)
    assert r.n == 5 and r.chain() == [10, 11]  # the rare long match beats the frequent short one
    r = ds.retrieve([9, 6, 7, 8, 1, 2], 2, max_suffix=2)
    assert r.n == 2 and r.occurrences == 4 and r.chain() == [20, 21]
    assert ds.retrieve([4, 4, 1, 2], 2, min_suffix=3).n == 0  # no suffix of length >= 3 occurs
    assert ds.retrieve([4, 4, 1, 2], 2, min_suffix=3).chain() == []
    assert ds.retrieve([2], 2, min_suffix=2).n == 0  # context shorter than min_suffix


def test_drafter_stops_at_stop_tokens_and_when_the_policy_says_so():
    ds = raw([[1, 2, 3, 4, 5, 6, 7]])

    class StopAfter(FixedGamma):
        def __init__(self, k):
            super().__init__(8)
            self.k, self.calls = k, []

        def keep_drafting(self, i, q_i, logits_i=None):
            self.calls.append((i, q_i))
            return i + 1 < self.k

    d = RestDrafter(ds, stop_ids=frozenset({5}))
    p = StopAfter(8)
    draft = d.propose([0, 1, 2], 8, p, Sampling(), None)
    assert draft.tokens == [3, 4, 5] and draft.q is None and draft.source == "rest"
    assert p.calls == [(0, None), (1, None)]  # asked after each token before the stop token
    assert RestDrafter(ds).propose([0, 1, 2], 8, StopAfter(2), Sampling(), None).tokens == [3, 4]
    assert RestDrafter(ds).propose([0, 1, 2], 3, FixedGamma(3), Sampling(), None).tokens == [3, 4, 5]
    assert RestDrafter(ds).propose([0, 1, 2], 0, FixedGamma(3), Sampling(), None).tokens == []
    assert RestDrafter(ds).propose([9, 9], 4, FixedGamma(4), Sampling(), None).tokens == []  # no match: no draft
    with pytest.raises(ValueError, match="min_suffix"):
        RestDrafter(ds, max_suffix=2, min_suffix=3)


# ---------------------------------------------------------------------------------------------- datastore file

def write_corpus(folder, texts):
    folder.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(texts):
        (folder / f"doc{i}.txt").write_text(t)
    return folder


def test_build_from_files_save_and_load_round_trip(tmp_path):
    tok = word_tokenizer(WORDS)
    corpus = write_corpus(tmp_path / "corpus", ["w1 w2 w3 w4", "w5 w1 w2 w9", "w7"])
    out = tmp_path / "ds.npz"
    ds = build_datastore_file(tok, corpus, out)
    assert ds.T.tolist() == [2, 3, 4, 5, SEP, 6, 2, 3, 10, SEP, 8, SEP]  # sorted files, SEP after each
    assert ds.header["n_tokens"] == 9 and ds.header["n_docs"] == 3
    back = Datastore.load(out)
    assert np.array_equal(back.T, ds.T) and np.array_equal(back.SA, ds.SA) and back.header == ds.header
    assert back.T.dtype == back.SA.dtype == np.int32
    assert back.retrieve([2, 3], 2, min_suffix=1).continuations.tolist() == [[4, 5], [10, SEP]]
    assert sorted(os.listdir(tmp_path)) == ["corpus", "ds.npz"]  # no temporary file left
    # glob corpus and limits
    ds = build_datastore(tok, str(corpus / "doc*.txt"), max_files=2, max_tokens=6)
    assert ds.T.tolist() == [2, 3, 4, 5, SEP, 6, 2, SEP] and ds.header["n_tokens"] == 6


def test_load_refuses_missing_and_foreign_files(tmp_path):
    with pytest.raises(DatastoreError, match="no REST datastore"):
        Datastore.load(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DatastoreError, match="not a readable"):
        Datastore.load(bad)
    other = tmp_path / "other.npz"
    np.savez(other, tokens=np.zeros(3, np.int32))
    with pytest.raises(DatastoreError):
        Datastore.load(other)


def test_a_datastore_built_with_another_tokenizer_is_refused(tmp_path, pair):
    target, _ = pair
    out = tmp_path / "ds.npz"
    other = word_tokenizer(["<unk>"] + [f"w{i}" for i in reversed(range(63))])  # same words, other ids
    Datastore.from_docs([[1, 2, 3]], other).save(out)
    with pytest.raises(DatastoreMismatchError, match="other tokens"):
        verispec.generate(target, PROMPT, method="rest", datastore=str(out), max_new_tokens=3)
    with pytest.raises(DatastoreMismatchError, match="no tokenizer"):
        Datastore.load(out).check_compatible(None, 64)
    # the same vocabulary in a fresh tokenizer object is accepted
    Datastore.from_docs([[1, 2, 3]], word_tokenizer(WORDS)).save(out)
    assert len(verispec.generate(target, PROMPT, method="rest", datastore=str(out), max_new_tokens=3).token_ids) == 3
    with pytest.raises(ValueError, match="needs a datastore"):
        verispec.generate(target, PROMPT, method="rest", max_new_tokens=3)
    with pytest.raises(DatastoreError, match="no REST datastore"):
        verispec.generate(target, PROMPT, method="rest", datastore=str(tmp_path / "nope.npz"), max_new_tokens=3)
    with pytest.raises(ValueError, match="unknown option"):
        verispec.generate(target, PROMPT, method="rest", datastore=str(out), max_sufix=3, max_new_tokens=3)
    with pytest.raises(DatastoreMismatchError, match="outside"):
        raw([[70]], vocab=100).check_compatible(None, 64)


def test_a_failed_build_leaves_nothing_half_written(tmp_path, monkeypatch):
    tok = word_tokenizer(WORDS)
    corpus = write_corpus(tmp_path / "corpus", ["w1 w2 w3"])
    out = tmp_path / "out" / "ds.npz"
    build_datastore_file(tok, corpus, out)
    before = out.read_bytes()

    def broken_savez(f, **arrays):
        f.write(b"PK\x03\x04 partial")  # some bytes reach the disk, then the write fails
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        build_datastore_file(tok, write_corpus(tmp_path / "c2", ["w4 w5"]), out)
    assert out.read_bytes() == before  # the previous datastore is intact
    assert os.listdir(out.parent) == ["ds.npz"]  # and no temporary file is left
    with pytest.raises(OSError):
        build_datastore_file(tok, corpus, tmp_path / "out" / "new.npz")
    assert os.listdir(out.parent) == ["ds.npz"]
    monkeypatch.undo()
    with pytest.raises(ValueError, match="no tokens"):  # an empty corpus fails before anything is written
        build_datastore_file(tok, write_corpus(tmp_path / "empty", [" "]), tmp_path / "out" / "e.npz")
    assert os.listdir(out.parent) == ["ds.npz"]


def test_stdlib_corpus_lists_python_files_only():
    files = corpus_files("stdlib")
    assert len(files) > 500 and all(f.suffix == ".py" for f in files) and files == sorted(files)
    assert not any("site-packages" in f.parts for f in files)
    from verispec.bench.datasets import bench_sources  # the benchmark's own source files are left out

    assert bench_sources() and not {f.resolve() for f in files} & bench_sources()


def test_cli_build_and_info(tmp_path, capsys):
    folder = tmp_path / "tok"
    word_tokenizer(WORDS).save_pretrained(folder)
    corpus = write_corpus(tmp_path / "corpus", ["w1 w2 w3 w4", "w2 w3 w9"])
    p = argparse.ArgumentParser(prog="verispec")
    register(p.add_subparsers(dest="cmd", required=True))
    out = tmp_path / "ds.npz"
    a = p.parse_args(["datastore", "build", "--target", str(folder), "--corpus", str(corpus), "--out", str(out),
                      "--quiet"])
    assert a.func(a) == 0
    assert "7 tokens from 2 files" in capsys.readouterr().out
    assert Datastore.load(out).retrieve([2, 3], 1).chain() == [4]  # tie 4 / 10: smallest id
    a = p.parse_args(["datastore", "info", str(out)])
    assert a.func(a) == 0
    assert "7 in 2 documents" in capsys.readouterr().out
    from verispec.cli import main
    assert main(["datastore", "build", "--target", str(tmp_path / "nope"), "--corpus", str(corpus),
                 "--out", str(tmp_path / "x.npz")]) == 2
    assert "unknown model" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------- losslessness

def ar(target, n):
    return verispec.generate(target, PROMPT, max_new_tokens=n).token_ids


@pytest.mark.parametrize("gamma", [1, 4, 8])
def test_greedy_rest_equals_ar_and_accepts_retrieved_drafts(pair, gamma):
    target, _ = pair
    plain = ar(target, 40)
    seq = PROMPT + plain
    # the corpus holds the model's own continuation (in pieces) among unrelated documents
    rng = np.random.default_rng(0)
    docs = [seq[i: i + 12] for i in range(0, len(seq), 9)] + [rng.integers(1, 64, 30).tolist() for _ in range(20)]
    ds = Datastore.from_docs(docs, target.tokenizer)
    out = verispec.generate(target, PROMPT, method="rest", datastore=ds, gamma=gamma, max_new_tokens=40)
    assert out.token_ids == plain
    s = out.stats
    assert s.accepted >= 15 and s.mat > 1.6 and s.drafter_forwards == 0
    assert {st.source for st in s.steps if st.drafted} == {"rest"}


def test_greedy_rest_equals_ar_when_retrieved_drafts_are_wrong(pair):
    target, _ = pair
    plain = ar(target, 40)
    seq = PROMPT + plain
    # every 2-token context of the output is followed, in the corpus, by tokens the model does not pick
    docs = [[seq[i - 1], seq[i], (seq[i + 1] + 1) % 64, (seq[i + 1] + 2) % 64] for i in range(1, len(seq) - 1)]
    ds = Datastore.from_docs(docs, target.tokenizer)
    out = verispec.generate(target, PROMPT, method="rest", datastore=ds, gamma=4, max_new_tokens=40)
    assert out.token_ids == plain
    assert out.stats.drafted >= 40 and out.stats.acceptance_rate < 0.25


class AcceptEverything(RejectionVerifier):
    """Broken on purpose: keeps every draft token whatever p says."""

    def verify(self, draft, p, generator):
        if len(draft):
            return VerifyResult(len(draft), int(torch.multinomial(p[len(draft)], 1, generator=generator)), "bonus")
        return super().verify(draft, p, generator)


def rest_datastore_for_distribution(law2):
    """Drafts after the prompt: the corpus' most frequent continuation of its suffix [5, 2] is x, a token the
    target gives moderate probability, so drafts are both kept and rejected."""
    p1 = law2.reshape(V, V).sum(1)  # (V,) target law of the first token
    x = int(np.argmin(np.abs(p1 - 0.4)))
    assert 0.1 < p1[x] < 0.9
    docs = [[5, 2, x, 1], [5, 2, x, 6], [5, 2, (x + 1) % V, 4], [3, 1, 2, 7]]
    return Datastore.from_docs(docs, vocab_size=V), p1[x]


def test_the_distribution_check_catches_a_verifier_that_ignores_p():
    """REST's chain and tree laws at K = 2 are in the contract suite (tests/test_contract.py); this is a second kind
    of broken verifier, one that keeps every draft."""
    target, _ = models()
    s = Sampling(temperature=1.0, seed=6)
    exact = law.exact_law(target, DIST_PROMPT, 2, s)
    ds = rest_datastore_for_distribution(exact)[0]
    job = law.job_for(target, lambda: RestDrafter(ds, min_suffix=1), lambda: FixedGamma(2), AcceptEverything)
    counts, rounds = law.draw(job, 1500, seed=6, n_tokens=2, sampling=s, prompt=DIST_PROMPT)
    assert rounds.drafted(1) == 1500
    assert law.chi2_pvalue(counts, exact) < 1e-6


def test_rest_is_registered_as_a_model_free_method():
    m = METHODS["rest"]
    assert not m.needs_draft_model and m.tree and m.load().__self__ is RestDrafter


def test_tiny_real_tokenizer_path(tmp_path):
    """A text datastore drives generation on a model that carries its tokenizer (the registry path)."""
    tok = word_tokenizer(WORDS)
    model = LoadedModel(tiny_llama(64, seed=3, scale=20.0), tok, "tiny")
    plain = verispec.generate(model, "w2 w16 w41 w4 w8", max_new_tokens=20)
    text = "w2 w16 w41 w4 w8 " + plain.text
    corpus = write_corpus(tmp_path / "c", [text])
    assert 0 not in plain.token_ids  # <unk> would not round-trip through text
    build_datastore_file(tok, corpus, tmp_path / "ds.npz")
    out = verispec.generate(model, "w2 w16 w41 w4 w8", method="rest", datastore=str(tmp_path / "ds.npz"),
                            gamma=4, max_new_tokens=20)
    assert out.token_ids == plain.token_ids and out.stats.accepted >= 10
