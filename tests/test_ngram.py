"""NASD (n-gram drafter): the store on its own and greedy equality with AR. Its sampling law at K = 2, with the
negative control, is in the contract suite (tests/test_contract.py), which runs every registered method."""

from __future__ import annotations

import random

import pytest
import torch

import verispec
from verispec.cache import CachedLM
from verispec.drafters.ngram import NGramDrafter, NGramStore
from verispec.engine import decode
from verispec.policies import FixedGamma
from verispec.sampling import Sampling
from verispec.types import Draft, VerifyResult
from verispec.verifiers import RejectionVerifier
from tests.conftest import tiny_llama
from tests.test_distribution import PROMPT, models

REPEAT = PROMPT * 2  # [1, 5, 2, 1, 5, 2]: the n-gram drafters find the prompt's own continuation
GREEDY_PROMPT = [3, 17, 42, 5, 9] * 3  # tiny random targets fall into loops: drafts get accepted
T1 = Sampling(temperature=1.0, seed=1)


def run(target, drafter, gamma, n, prompt=GREEDY_PROMPT, sampling=Sampling(), stop_ids=frozenset()):
    return decode(CachedLM(target), drafter, RejectionVerifier(), FixedGamma(gamma), prompt, max_new_tokens=n,
                  sampling=sampling, stop_ids=stop_ids, method="test", generator=torch.Generator().manual_seed(0))


def ar(target, n, prompt=GREEDY_PROMPT):
    return verispec.generate(target, prompt, max_new_tokens=n).token_ids


# ---------------------------------------------------------------- the store on its own


def test_backoff_longest_context_wins_down_to_one_token():
    s = NGramStore(max_n=4)
    s.update([7, 8, 9, 1])  # (7,8,9) -> 1, (8,9) -> 1, (9,) -> 1
    for _ in range(3):
        s.update([0, 8, 9, 2])  # (8,9) -> 2 three times: more frequent, but a shorter context
    s.update([5, 6, 9, 3, 3])  # (9,) -> 3 once more: (9,) has {1: 1, 2: 3, 3: 1}
    assert s.predict([7, 8, 9]) == (1, 3, 1)  # the longest context wins over the more frequent shorter one
    assert s.predict([4, 8, 9]) == (2, 2, 3)  # 3-token miss -> the 2-token context
    assert s.predict([4, 4, 9]) == (2, 1, 3)  # 3- and 2-token misses -> the 1-token context
    assert s.predict([9]) == (2, 1, 3)  # a context shorter than max_n - 1 uses what it has
    assert s.predict([4, 4, 4]) is None  # no match at any level


def test_most_frequent_continuation_ties_to_most_recent():
    s = NGramStore(max_n=2)
    s.update([1, 2, 1, 3])
    assert s.predict([1])[0] == 3  # 2 and 3 seen once each: the most recent wins
    s.update([1, 2, 1, 2, 1, 3], start=0)
    assert s.counts([1]) == {2: 3, 3: 2} and s.predict([1])[0] == 2  # now 2 is the most frequent


def test_confidence_thresholds_back_off_past_weak_contexts():
    s = NGramStore(max_n=3)
    s.update([4, 1, 2, 5, 1, 2, 5, 3, 1, 2, 6])  # (4,1)->2 once; (1,2)->5 twice, ->6 once; (2,)->5 twice
    assert s.predict([4, 1, 2]) == (5, 2, 2)
    assert s.predict([8, 1, 2], min_context=2, min_count=3) is None  # best of (1,2) seen only twice
    assert s.predict([8, 8, 2], min_count=2) == (5, 1, 2)
    assert s.predict([8, 8, 2], min_context=2) is None  # the 1-token match is not long enough


def test_context_eviction_is_least_recently_updated():
    s = NGramStore(max_n=2, max_contexts=3)
    s.update([1, 10, 2, 20, 3])  # contexts (1,) (10,) (2,) (20,): (1,) evicted when (20,) arrives
    assert len(s) == 3 and s.counts([1]) == {} and s.counts([10]) == {2: 1}
    s.add((10,), 4)  # refresh (10,): now (2,) is the least recently updated
    s.add((30,), 5)
    assert s.counts([2]) == {} and s.counts([10]) == {2: 1, 4: 1} and s.counts([30]) == {5: 1}


def test_continuation_eviction_drops_least_frequent_then_oldest():
    s = NGramStore(max_n=2, max_continuations=2)
    for t in (5, 5, 6, 7):  # (1,) -> 5 twice, 6 once, then 7 evicts 6 (least frequent)
        s.add((1,), t)
    assert s.counts([1]) == {5: 2, 7: 1} and s.predict([1])[0] == 5
    s.add((1,), 8)  # 7 is the least frequent: evicted
    assert s.counts([1]) == {5: 2, 8: 1}
    s.add((1,), 8)
    s.add((1,), 8)
    assert s.predict([1])[0] == 8


class _Policy(FixedGamma):
    def __init__(self, stop_after=None):
        super().__init__(8)
        self.calls, self.stop_after = [], stop_after

    def keep_drafting(self, i, q_i, logits_i=None):
        assert q_i is None  # deterministic drafts carry no distribution
        self.calls.append(i)
        return self.stop_after is None or i < self.stop_after


def test_update_after_acceptance_and_after_rejection():
    d = NGramDrafter(max_n=3)
    prompt = [1, 2, 3, 1, 2]
    d.prefill(prompt)
    draft = d.propose(prompt, 4, _Policy(), T1, None)
    assert draft.tokens == [3, 1, 2, 3] and draft.q is None and draft.source == "ngram"
    # rejection at position 1: the verifier kept 3, then recovered 7; the drafts 1, 2, 3 were never committed
    tokens = prompt + [3, 7]
    d.commit(tokens, draft, VerifyResult(1, 7, "recovered"))
    assert d.store.counts([1, 2]) == {3: 2}  # the accepted draft token entered
    assert d.store.counts([2, 3]) == {1: 1, 7: 1} and d.store.counts([3]) == {1: 1, 7: 1}  # so did the recovered
    assert d.store.counts([3, 7]) == {}  # ... but nothing after it: the rejected drafts did not
    assert d.propose(tokens, 4, _Policy(), T1, None).tokens == []  # (3,7) and (7,) unseen: no match at any level
    # acceptance of the whole draft plus a bonus token
    draft = Draft([1, 2, 3, 1], None, "ngram")
    tokens = tokens + [1, 2, 3, 1, 9]  # all four drafts accepted, then the bonus token 9
    d.commit(tokens, draft, VerifyResult(4, 9, "bonus"))
    assert d.store.counts([7, 1]) == {2: 1} and d.store.counts([3, 1]) == {2: 1, 9: 1}
    assert d.store.counts([1, 2]) == {3: 3}


def test_store_holds_exactly_the_committed_tokens_after_sampling():
    """Under sampling many drafts are rejected; the store must equal one built from the final text alone."""
    target, _ = models()
    d = NGramDrafter(max_n=3)
    out, s = run(target, d, 3, 60, prompt=REPEAT * 3, sampling=Sampling(temperature=1.0, seed=5))
    assert s.recovered > 0 and s.accepted > 0  # both kinds of update happened
    fresh = NGramStore(max_n=3)
    fresh.update(REPEAT * 3 + out)
    assert len(fresh) == len(d.store)
    assert all(d.store.counts(c) == fresh.counts(c) for c in fresh._table)


def test_draft_stops_after_a_stop_token_and_at_the_policy():
    d = NGramDrafter(stop_ids=frozenset({3}))
    d.prefill([1, 2, 3, 1, 2, 3, 1, 2])
    assert d.propose([1, 2, 3, 1, 2, 3, 1, 2], 5, _Policy(), T1, None).tokens == [3]
    d = NGramDrafter()
    d.prefill([1, 2, 3, 1, 2, 3, 1, 2])
    p = _Policy(stop_after=1)
    assert d.propose([1, 2, 3, 1, 2, 3, 1, 2], 5, p, T1, None).tokens == [3, 1] and p.calls == [0, 1]
    assert d.propose([1, 2, 3, 1, 2, 3, 1, 2], 0, p, T1, None).tokens == []


def test_memory_bound_on_a_long_generation():
    class Recording(NGramDrafter):
        def commit(self, tokens, draft, result):
            super().commit(tokens, draft, result)
            self.sizes.append(len(self.store))
            self.widths.append(max(len(e.counts) for e in self.store._table.values()))

    d = Recording(max_n=4, max_contexts=64, max_continuations=2)
    d.sizes, d.widths = [], []
    target = tiny_llama(64, seed=3, scale=1.0)  # flat distributions: a varied text with many contexts
    prompt = [random.Random(0).randrange(64) for _ in range(20)]
    out, s = run(target, d, 4, 400, prompt=prompt, sampling=Sampling(temperature=1.0, seed=0))
    assert len(out) == 400 and len(d.sizes) == len(s.steps)
    distinct = {tuple((prompt + out)[j - k:j]) for j in range(1, 420) for k in range(1, min(3, j) + 1)}
    assert len(distinct) > 10 * 64  # eviction really happened, many times
    assert max(d.sizes) == 64 and max(d.widths) <= 2
    last = (prompt + out)[-4:]
    assert all(last[3] in d.store.counts(last[k:3]) for k in range(3))  # the newest n-grams are kept


# ---------------------------------------------------------------- end to end


@pytest.mark.parametrize("gamma", [1, 3, 6])
def test_greedy_matches_ar_and_drafts_are_accepted(pair, gamma):
    target, _ = pair
    out = verispec.generate(target, GREEDY_PROMPT, method="nasd", gamma=gamma, max_new_tokens=60)
    assert out.token_ids == ar(target.model, 60)
    s = out.stats
    assert s.accepted >= 10 and s.mat > 1.2  # the store drafted and the target agreed
    assert s.drafter_forwards == 0 and {st.source for st in s.steps} == {"ngram"}


def test_greedy_matches_ar_with_a_tiny_store_and_other_n(pair):
    target, _ = pair
    for opts in ({"max_n": 2}, {"max_n": 6}, {"max_contexts": 4, "max_continuations": 1}):
        out = verispec.generate(target, GREEDY_PROMPT, method="nasd", gamma=4, max_new_tokens=60, **opts)
        assert out.token_ids == ar(target.model, 60), opts


# ---------------------------------------------------------------- options


@pytest.mark.parametrize("opts", [{"max_n": 1}, {"max_n": 2.5}, {"max_n": True}, {"max_contexts": 0},
                                  {"max_continuations": 0}, {"max_n": 4, "min_context": 4}, {"min_count": 0},
                                  {"min_context": 0}, {"max_n": "3"}])
def test_impossible_options_raise(pair, opts):
    with pytest.raises(ValueError, match=next(iter(opts)) if len(opts) == 1 else "min_context"):
        NGramDrafter(**opts)
    with pytest.raises(ValueError):
        verispec.generate(pair[0], GREEDY_PROMPT, method="nasd", max_new_tokens=2, **opts)


def test_unknown_option_is_named(pair):
    with pytest.raises(ValueError, match="maxn.*nasd"):
        verispec.generate(pair[0], GREEDY_PROMPT, method="nasd", max_new_tokens=2, maxn=3)
