"""Prompt lookup decoding: matching rules and greedy equality with AR (its sampling law at K = 2, with the negative
control, is in the contract suite, tests/test_contract.py)."""

from __future__ import annotations

import pytest

import verispec
from verispec.drafters.prompt_lookup import PromptLookupDrafter
from verispec.sampling import Sampling
from verispec.types import VerifyResult
from tests.test_distribution import models
from tests.test_ngram import GREEDY_PROMPT, T1, _Policy, ar, run


def propose(d: PromptLookupDrafter, tokens, gamma=8, policy=None):
    d.prefill(tokens)
    return d.propose(tokens, gamma, policy or _Policy(), T1, None)


def test_longest_match_wins_then_the_most_recent():
    d = PromptLookupDrafter(max_ngram_size=3)
    tokens = [1, 2, 3, 40, 50, 9, 3, 60, 70, 8, 1, 2, 3]
    assert d.match(tokens) is None  # nothing indexed yet
    assert propose(d, tokens, 2).tokens == [40, 50]  # (1,2,3) beats the more recent 1-token match of 3
    assert d.match(tokens) == (3, 3)
    tokens = [5, 3, 40, 41, 9, 3, 60, 61, 8, 3]
    assert propose(d, tokens, 2).tokens == [60, 61]  # two 1-token matches: the most recent is copied


def test_min_ngram_size_ignores_shorter_matches():
    tokens = [9, 3, 40, 41, 8, 3]
    assert propose(PromptLookupDrafter(min_ngram_size=1), tokens, 2).tokens == [40, 41]
    assert propose(PromptLookupDrafter(min_ngram_size=2), tokens, 2).tokens == []


def test_copy_overlaps_into_its_own_draft_and_respects_the_caps():
    d = PromptLookupDrafter(max_ngram_size=3, num_pred_tokens=5)
    assert propose(d, [7, 1, 2, 1, 2], 8).tokens == [1, 2, 1, 2, 1]  # the period-2 repeat continues
    assert propose(d, [7, 1, 2, 1, 2], 3).tokens == [1, 2, 1]  # gamma caps
    assert propose(d, [7, 1, 2, 1, 2], 0).tokens == []
    d = PromptLookupDrafter(stop_ids=frozenset({2}))
    assert propose(d, [7, 1, 2, 1, 2, 3, 1], 8).tokens == [2]  # stop after a stop token
    p = _Policy(stop_after=1)
    assert propose(PromptLookupDrafter(), [7, 1, 2, 1, 2, 3, 1], 8, p).tokens == [2, 3] and p.calls == [0, 1]


def test_generated_text_is_searched_only_when_asked():
    prompt, out = [1, 2, 3], [7, 8, 9, 7]
    for search, expected in ((True, [8, 9]), (False, [])):
        d = PromptLookupDrafter(search_generated=search)
        d.prefill(prompt)
        d.commit(prompt + out, None, VerifyResult(0, 7, "bonus"))
        assert d.propose(prompt + out, 2, _Policy(), T1, None).tokens == expected
    assert d.propose(prompt + out + [1, 2], 2, _Policy(), T1, None).tokens == [3, 7]  # the prompt still matches


def test_index_holds_exactly_the_committed_tokens_after_sampling():
    target, _ = models()
    d = PromptLookupDrafter()
    prompt = [6, 1, 5, 2, 1, 5] * 3
    out, s = run(target, d, 3, 60, prompt=prompt, sampling=Sampling(temperature=1.0, seed=5))
    assert s.recovered > 0 and s.accepted > 0
    fresh = PromptLookupDrafter()
    fresh.prefill(prompt + out)
    assert d._follow == fresh._follow


@pytest.mark.parametrize("gamma", [1, 3, 6])
def test_greedy_matches_ar_and_drafts_are_accepted(pair, gamma):
    target, _ = pair
    out = verispec.generate(target, GREEDY_PROMPT, method="pld", gamma=gamma, max_new_tokens=60)
    assert out.token_ids == ar(target.model, 60)
    assert out.stats.accepted >= 10 and {st.source for st in out.stats.steps} == {"prompt_lookup"}


def test_greedy_matches_ar_for_other_settings(pair):
    target, _ = pair
    for opts in ({"max_ngram_size": 1}, {"min_ngram_size": 2, "max_ngram_size": 4}, {"num_pred_tokens": 1},
                 {"search_generated": False}):
        out = verispec.generate(target, GREEDY_PROMPT, method="pld", gamma=4, max_new_tokens=60, **opts)
        assert out.token_ids == ar(target.model, 60), opts


PLD_PROMPT = [6, 1, 5, 2, 1, 5]  # suffix (1, 5) matched at the start: the draft is [2, 1]


@pytest.mark.parametrize("opts", [{"max_ngram_size": 0}, {"min_ngram_size": 0}, {"num_pred_tokens": 0},
                                  {"max_ngram_size": 2, "min_ngram_size": 3}, {"search_generated": "yes"},
                                  {"num_pred_tokens": 2.0}])
def test_impossible_options_raise(pair, opts):
    with pytest.raises(ValueError, match=list(opts)[-1]):
        PromptLookupDrafter(**opts)
    with pytest.raises(ValueError):
        verispec.generate(pair[0], GREEDY_PROMPT, method="pld", max_new_tokens=2, **opts)
    with pytest.raises(ValueError, match="unknown option"):
        verispec.generate(pair[0], GREEDY_PROMPT, method="pld", max_new_tokens=2, max_n=3)
