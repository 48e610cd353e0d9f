"""Target features for drafters: every cached position's rows equal the hidden states of one plain forward over the
committed tokens, through chains, rollbacks, token trees, the native decoder and the ragged batch."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_llama
from verispec.cache import CachedLM, score_batch
from verispec.features import FeatureBuffer, check_spec
from verispec.types import Draft, VerifyResult


def reference(model, tokens, spec):
    """Hidden states of one transformers forward over `tokens`: final-norm output and the inputs of layers."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([tokens]), output_hidden_states=True)
        body = model.get_decoder()
        h = body(input_ids=torch.tensor([tokens])).last_hidden_state[0]  # (T, H) final-norm
    cols = [h if s == "final" else out.hidden_states[s][0] for s in spec]
    return torch.cat(cols, dim=-1)  # (T, F)


SPEC = ("final", 1, 0)


def test_chain_rollback_and_tree_keep_features_aligned():
    model = tiny_llama(64, seed=3, layers=3)
    lm = CachedLM(model)
    lm.track_features(SPEC)
    lm.reset()
    tokens = [5, 9, 2, 7, 1]
    lm.prefill(tokens[:-1])
    torch.testing.assert_close(lm.features, reference(model, tokens[:-1], SPEC), rtol=1e-4, atol=1e-5)
    lm.score(tokens, Draft([3, 4, 8]))  # chain: pending + 3 drafts fed
    tokens += [3, 11]  # one draft kept, then another token
    lm.rollback(tokens)
    assert lm.features.shape == (len(tokens) - 1, 3 * 32)  # every committed token but the newest is cached
    torch.testing.assert_close(lm.features, reference(model, tokens[:-1], SPEC), rtol=1e-4, atol=1e-5)
    tree = Draft([6, 7, 8, 9], parents=[-1, -1, 0, 1])
    lm.score(tokens, tree)
    tokens += [7, 9, 40]  # node 1 then node 3 kept, then a bonus
    lm.rollback(tokens)
    torch.testing.assert_close(lm.features, reference(model, tokens[:-1], SPEC), rtol=1e-4, atol=1e-5)
    lm.untrack_features()
    assert not model.get_decoder().norm._forward_hooks  # nothing of ours stays on a shared model


def test_engine_hands_drafter_the_committed_features():
    from verispec.drafters.base import Drafter
    from verispec.engine import decode
    from verispec.policies.fixed import FixedGamma
    from verispec.sampling import Sampling
    from verispec.verifiers.rejection import RejectionVerifier

    seen = []

    class Spy(Drafter):
        target_features = ("final",)

        def take_features(self, f):
            seen.append(f.clone())

        def propose(self, tokens, gamma, policy, sampling, generator):
            assert seen[-1].shape[0] == len(tokens) - 1
            return Draft([tokens[-1]] * gamma)

    model = tiny_llama(64, seed=4)
    ids, _ = decode(CachedLM(model), Spy(), RejectionVerifier(), FixedGamma(3), [1, 2, 3], max_new_tokens=12,
                    sampling=Sampling(), stop_ids=frozenset(), method="spy")
    full = [1, 2, 3] + ids
    torch.testing.assert_close(seen[-1], reference(model, full[: seen[-1].shape[0]], ("final",)),
                               rtol=1e-4, atol=1e-5)
    assert not model.get_decoder().norm._forward_hooks


def test_native_ragged_features_match_solo():
    from verispec.backends.native import to_native

    model = to_native(tiny_llama(64, seed=5, layers=2, hidden=64))
    lms = [CachedLM(model) for _ in range(2)]
    solo = CachedLM(model)
    for lm in lms + [solo]:
        lm.track_features(("final", 1))
        lm.reset()
    seqs = [[1, 2, 3, 4, 5], [9, 8, 7]]
    drafts = [Draft([6, 7]), Draft([1, 2, 3], parents=[-1, -1, 0])]
    score_batch(lms, seqs, drafts)
    solo.score(seqs[1], drafts[1])
    assert torch.equal(lms[1].feats.view(), solo.feats.view())  # bit-identical to its solo forward
    assert lms[0].feats.view().shape[0] == 5 + 2  # the 5 tokens + 2 drafts, all fed in one forward
    for lm in lms + [solo]:
        lm.untrack_features()


def test_bad_spec_is_refused_and_tracking_starts_empty():
    with pytest.raises(ValueError, match="layer index"):
        check_spec(("final", 7), 2)
    with pytest.raises(ValueError, match="at least one"):
        check_spec((), 2)
    lm = CachedLM(tiny_llama(64))
    lm.forward([1, 2, 3])
    with pytest.raises(ValueError, match="no features"):
        lm.features
    lm.track_features(("final",))  # tracking starts from an empty cache
    assert lm.ids == [] and lm.features.shape == (0, 32)


def test_buffer_grows_crops_and_selects():
    b = FeatureBuffer(2)
    b.append(torch.arange(200.).reshape(100, 2))
    b.crop(10)
    b.append(torch.full((3, 2), -1.0))
    assert b.view().shape == (13, 2) and b.view()[10, 0] == -1
    b.select(torch.tensor([0, 2, 12]))
    assert b.view()[:, 0].tolist() == [0.0, 4.0, -1.0]
