"""EAGLE: the draft vocabulary's d2t/t2d tables, EAGLE-2 tree growth on hand-made logits, training-time test computing
what drafting computes, training lowering the loss on a learnable pattern (both fusions), the drafter folder (resume,
wrong target refused) and a trained drafter whose drafts are accepted while its greedy output stays the target's,
and the vLLM EAGLE-3 export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import verispec
from tests.conftest import tiny_llama
from verispec.cache import CachedLM
from verispec.drafters import eagle
from verispec.drafters.eagle import EagleModel, best_subtree, d2t_t2d, grow_tree, vocab_of
from verispec.drafters.folder import load_drafter
from verispec.models import LoadedModel


def test_d2t_t2d_round_trip():
    ids = torch.tensor([0, 3, 4, 9, 15])
    d2t, t2d = d2t_t2d(ids, 16)
    assert d2t.dtype == torch.int64 and t2d.dtype == torch.bool and t2d.shape == (16,)
    assert d2t.tolist() == [0, 2, 2, 6, 11]  # target = draft + d2t[draft]
    assert torch.equal(vocab_of(d2t), ids) and torch.equal(t2d.nonzero()[:, 0], ids)
    full_d2t, full_t2d = d2t_t2d(None, 8)
    assert not full_d2t.any() and full_t2d.all()
    with pytest.raises(ValueError, match="ascending"):
        d2t_t2d(torch.tensor([3, 1]), 8)


def test_eagle2_tree_keeps_the_best_connected_nodes():
    root = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    child = {0: torch.tensor([0.1, 0.5, 0.3, 0.1]), 1: torch.tensor([0.9, 0.05, 0.03, 0.02])}
    calls = []

    def expand(frontier, nodes, parents):
        calls.append(list(frontier))
        return torch.stack([root if f < 0 else child[nodes[f]].log() for f in frontier])  # (F, 4)

    nodes, parents, score = grow_tree(expand, depth=2, top_k=2)
    # root's top-2 (0: .5, 1: .3); their children 0->1 .25, 0->2 .15, 1->0 .27, 1->1 .015: the global top-2 stay
    assert calls == [[-1], [0, 1]]
    assert nodes == [0, 1, 1, 0] and parents == [-1, -1, 0, 1]
    assert np.allclose(np.exp(score), [0.5, 0.3, 0.25, 0.27])
    toks, par = best_subtree(nodes, parents, score, 3)  # the best 3: .5, .3, .27 (1->0), re-indexed
    assert toks == [0, 1, 0] and par == [-1, -1, 1]
    toks, par = best_subtree(nodes, parents, score, 2)
    assert toks == [0, 1] and par == [-1, -1]
    assert grow_tree(expand, 2, 2, stop=frozenset({0, 1}))[0] == [0, 1]  # stop tokens are not expanded


def deep_target(scale: float = 1.0):
    return tiny_llama(64, seed=7, layers=6, hidden=32, scale=scale)


def test_training_time_test_computes_what_drafting_computes():
    """Step s of the training-time test at row j is the depth-s draft node after the committed tokens[:j + 2] with the
    true next tokens: same attention, positions and fed-back features as the drafter's cache and tree."""
    target = deep_target()
    ids = [(5 * i) % 23 + 1 for i in range(20)]
    model = eagle.fit_to_text(target, ids, "eagle3", steps=3)
    spec = eagle.STORE_SPEC(target)
    lm = CachedLM(target)
    lm.track_features(spec)
    lm.prefill(ids)
    feats = lm.features.clone()
    inp_cols, fin_cols = eagle.split_features(spec, "eagle3", feats.shape[1])
    tok, inp, _ = eagle.window_batch([(np.asarray(ids), feats.numpy())], np.array([[0, 0]]), len(ids), inp_cols,
                                     fin_cols)
    with torch.no_grad():
        hs = eagle.ttt_forward(model, tok, inp, steps=3)  # s x (1, W-1, H)
    d = eagle.EagleDrafter(model, tree="chain")
    n = 12  # committed tokens[:n]; the root is row n-2
    d.take_features(feats[: n - 1, inp_cols])  # what the engine hands over: the three layer inputs
    d.prefill(ids[:n])
    d.propose(ids[:n], 0, None, None, None)
    torch.testing.assert_close(d.root[0], hs[0][0, n - 2], rtol=0, atol=1e-5)
    d.tK = d.tV = torch.empty(d.K.shape[0], 0, d.K.shape[2])
    draft_id = {int(t): i for i, t in enumerate(d.vocab)}
    h1 = d._nodes([draft_id[ids[n]]], d.root[0][None], [1], [[]])
    torch.testing.assert_close(h1[0], hs[1][0, n - 2], rtol=0, atol=1e-5)
    h2 = d._nodes([draft_id[ids[n + 1]]], h1, [2], [[0]])
    torch.testing.assert_close(h2[0], hs[2][0, n - 2], rtol=0, atol=1e-5)


def pattern_store(tmp_path, target, spec, n_seq: int = 12, length: int = 40):
    """A feature store whose tokens follow a fixed cycle (learnable from the features)."""
    from verispec.distill import STORE_FILE
    from verispec.drafters.layer_skip import fingerprint

    store = tmp_path / "store"
    store.mkdir()
    shards = []
    lm = CachedLM(target)
    for s in range(n_seq):
        seq = [(3 * (i + s)) % 17 + 1 for i in range(length)]
        lm.track_features(spec)
        lm.prefill(seq)
        np.save(store / f"shard-{s:05d}.tokens.npy", np.asarray(seq, dtype=np.int32))
        np.save(store / f"shard-{s:05d}.features.npy", lm.features.to(torch.float16).numpy())
        lm.untrack_features()
        shards.append({"file": f"shard-{s:05d}", "tokens": length, "prompt": length})
    (store / STORE_FILE).write_text(json.dumps({"target": "tiny", "fingerprint": fingerprint(target),
                                                "spec": list(spec), "width": 32 * len(spec), "shards": shards}))
    return LoadedModel(target, None, "tiny"), store


@pytest.mark.parametrize("fusion", ["eagle1", "eagle3"])
def test_training_lowers_the_loss_and_the_drafter_keeps_greedy_output(tmp_path, fusion):
    base = tiny_llama(64, seed=7, hidden=32, scale=20.0) if fusion == "eagle1" else deep_target(scale=20.0)
    target, store = pattern_store(tmp_path, base, ("final",) if fusion == "eagle1" else eagle.STORE_SPEC(base))
    out = eagle.train_heads(target, store, tmp_path / "eagle", steps=80, batch=64, window=16, lr=1e-2,
                            draft_vocab=32, ttt_steps=2, workdir=tmp_path / "work", progress=False)
    assert out["fusion"] == fusion and out["draft_vocab_size"] == 32
    assert out["loss_last"] < 0.5 * out["loss_first"]
    # on a held-out sequence, the target's top-1 is matched far above chance (1/32): learnt from the features
    assert out["top1_by_depth"][0] > 0.25
    cfg, tensors, _ = load_drafter(tmp_path / "eagle", "eagle", target.model)
    loaded = EagleModel.from_tensors(cfg, tensors)
    for (k, a), b in zip(loaded.state_dict().items(), out["heads"].state_dict().values()):
        assert torch.equal(a, b), k
    prompt = [(3 * i) % 17 + 1 for i in range(12)]
    ar = verispec.generate(target.model, prompt, method="ar", max_new_tokens=24).token_ids
    for tree in ("dynamic", "chain"):
        got = verispec.generate(target, prompt, method="eagle", heads=str(tmp_path / "eagle"), tree=tree,
                                max_new_tokens=24, gamma=3)
        assert got.token_ids == ar
        assert got.stats.accepted > 0


def test_drafts_stay_in_the_draft_vocabulary():
    target = tiny_llama(64, seed=1, scale=20.0)
    ids = [3, 17, 42, 5, 9] * 4
    vocab_ids = torch.tensor(sorted(set(ids)))
    model = eagle.fit_to_text(target, ids, "eagle1", steps=5, vocab_ids=vocab_ids)
    d = eagle.EagleDrafter(model, top_k=3, nodes=8)
    lm = CachedLM(target)
    lm.track_features(d.target_features)
    lm.prefill(ids[:-1])
    d.take_features(lm.features)
    d.prefill(ids)
    from verispec.policies import FixedGamma

    draft = d.propose(ids, 3, FixedGamma(3), None, None)
    assert draft.tokens and set(draft.tokens) <= set(vocab_ids.tolist()) and len(draft.tokens) <= 8


def test_resumed_training_ends_in_the_state_of_an_uninterrupted_run(tmp_path):
    target, store = pattern_store(tmp_path, tiny_llama(64, seed=7, hidden=32), ("final",), n_seq=4, length=20)
    kw = dict(draft_vocab=16, batch=16, window=8, lr=1e-3, progress=False, out=None, ttt_steps=2)
    full = eagle.train_heads(target, store, steps=12, workdir=tmp_path / "a", **kw)
    eagle.train_heads(target, store, steps=12, workdir=tmp_path / "b", tokens=6 * 14, **kw)  # stops at step 6
    resumed = eagle.train_heads(target, store, steps=12, workdir=tmp_path / "b", **kw)
    assert resumed["resumed_from"] == 6
    for a, b in zip(full["heads"].state_dict().values(), resumed["heads"].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_wrong_target_is_refused(tmp_path):
    from verispec.drafters.folder import save_drafter
    from verispec.drafters.layer_skip import fingerprint

    target = tiny_llama(64, seed=7)
    model = EagleModel.new(target, "eagle1")
    save_drafter(tmp_path / "e", "eagle", model.config(), model.tensors(), "tiny", fingerprint(target))
    other = tiny_llama(64, seed=8)
    with pytest.raises(ValueError, match="trained for target"):
        verispec.generate(other, [1, 2, 3], method="eagle", heads=str(tmp_path / "e"), max_new_tokens=2)
    with pytest.raises(ValueError, match="holds a 'eagle'"):
        load_drafter(tmp_path / "e", "medusa")
    out = verispec.generate(target, [1, 2, 3], method="eagle", heads=str(tmp_path / "e"), max_new_tokens=2)
    assert len(out.token_ids) == 2


def test_warm_start_copies_the_targets_last_layer():
    target = deep_target()
    m = EagleModel.new(target, "eagle3", warm_start=True)
    last = target.model.layers[-1]
    H = 32
    assert torch.equal(m.midlayer.self_attn.q_proj.weight[:, H:], last.self_attn.q_proj.weight)
    assert not m.midlayer.self_attn.q_proj.weight[:, :H].any()
    assert torch.equal(m.midlayer.mlp.down_proj.weight, last.mlp.down_proj.weight)
    assert torch.equal(m.fc.weight[:, -H:], torch.eye(H))


def test_vllm_export_has_the_eagle3_layout(tmp_path):
    from safetensors.torch import load_file

    from verispec.drafters.folder import save_drafter
    from verispec.drafters.layer_skip import fingerprint

    target = tiny_llama(64, seed=7, layers=8, hidden=32)  # L = 8: layers (2, 4, 5), no clamping
    vocab_ids = torch.tensor([1, 2, 5, 8, 13, 21, 34, 55])
    model = EagleModel.new(target, "eagle3", vocab_ids)
    save_drafter(tmp_path / "e3", "eagle", model.config(), model.tensors(), "tiny", fingerprint(target))
    out = eagle.export_vllm(tmp_path / "e3", tmp_path / "vllm", target)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["num_hidden_layers"] == 1
    assert (cfg["hidden_size"], cfg["vocab_size"], cfg["draft_vocab_size"]) == (32, 64, 8)
    assert cfg["eagle_config"] == {"use_aux_hidden_state": True, "eagle_aux_hidden_state_layer_ids": [2, 4, 5]}
    for k in ("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
              "rope_theta", "hidden_act", "max_position_embeddings"):
        assert cfg[k] == model.cfg[k], k
    t = load_file(str(out / "model.safetensors"))
    nh, nkv, hd, inner = 4, 2, 8, 64
    want = {"fc.weight": (32, 96), "lm_head.weight": (8, 32), "norm.weight": (32,), "d2t": (8,), "t2d": (64,),
            "midlayer.input_layernorm.weight": (32,), "midlayer.hidden_norm.weight": (32,),
            "midlayer.post_attention_layernorm.weight": (32,),
            "midlayer.self_attn.q_proj.weight": (nh * hd, 64), "midlayer.self_attn.k_proj.weight": (nkv * hd, 64),
            "midlayer.self_attn.v_proj.weight": (nkv * hd, 64), "midlayer.self_attn.o_proj.weight": (32, nh * hd),
            "midlayer.mlp.gate_proj.weight": (inner, 32), "midlayer.mlp.up_proj.weight": (inner, 32),
            "midlayer.mlp.down_proj.weight": (32, inner)}
    assert {k: tuple(v.shape) for k, v in t.items()} == want
    assert t["d2t"].dtype == torch.int64 and t["t2d"].dtype == torch.bool
    assert torch.equal(t["d2t"] + torch.arange(8), vocab_ids) and torch.equal(t["t2d"].nonzero()[:, 0], vocab_ids)
    rows = target.lm_head.weight[vocab_ids]
    assert torch.equal(t["lm_head.weight"], rows)  # the target's rows of the draft vocabulary (frozen head)
    e1 = EagleModel.new(target, "eagle1")
    save_drafter(tmp_path / "e1", "eagle", e1.config(), e1.tensors(), "tiny", fingerprint(target))
    with pytest.raises(ValueError, match="EAGLE-1.*eagle3"):
        eagle.export_vllm(tmp_path / "e1", tmp_path / "vllm1")


def test_int4_drafting_keeps_the_eagle3_fc_in_fp32(tmp_path):
    """EAGLE-3's fc reads the target's raw residual stream (a few huge channels): an int8 activation copy of it
    flattened the prompt's features on the real target, so int4 drafting quantizes the layer and head, not fc."""
    from types import SimpleNamespace

    from torch import nn

    from verispec.drafters.folder import save_drafter
    from verispec.drafters.layer_skip import fingerprint
    from verispec.kernels.int4 import Int4Linear

    target = deep_target()
    model = EagleModel.new(target, "eagle3")
    save_drafter(tmp_path / "e3", "eagle", model.config(), model.tensors(), "tiny", fingerprint(target))
    ctx = SimpleNamespace(options={"heads": str(tmp_path / "e3"), "weights": "int4"},
                          target=LoadedModel(target, None, "tiny"), stop_ids=frozenset())
    d = eagle.EagleDrafter.from_ctx(ctx)
    assert type(d.model.fc) is nn.Linear
    quantized = [m for m in d.model.modules() if isinstance(m, Int4Linear)]
    if Int4Linear.from_linear(nn.Linear(32, 32)) is not None:  # where this machine's int4 kernel runs
        assert quantized and all(not n.startswith("fc") for n, m in d.model.named_modules() if m in quantized)
