"""ParallelSpec (`verispec.drafters.parallelspec`): one drafter forward per round, the training layout equal to the
drafting layout, training that learns, and drafter folders checked on load. Greedy equality and the χ² law come
from the contract suite (tests/test_contract.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from verispec.api import _Ctx
from verispec.drafters.folder import save_drafter
from verispec.drafters.parallelspec import (MaskHeads, ParallelSpecDrafter, fit, held_out_accuracy, layout,
                                             mask_logits, teacher_rows, window_batch)
from verispec.drafters.layer_skip import fingerprint
from verispec.models import LoadedModel
from verispec.policies import FixedGamma
from verispec.sampling import Sampling
from tests.conftest import tiny_llama


def random_heads(hidden: int, n_masks: int = 3, seed: int = 0) -> MaskHeads:
    torch.manual_seed(seed)
    heads = MaskHeads(hidden, n_masks)
    with torch.no_grad():
        heads.masks.normal_(0.0, 0.5)
        for b in heads.blocks:
            b.linear.weight.normal_(0.0, 0.1)  # non-identity blocks: the test sees where they are applied
    return heads.eval()


def test_layout_places_each_mask_after_its_anchor():
    where = torch.tensor([[2, 5]])  # (B, A)
    allowed, pos = layout(8, where, 2)  # Q = 8 + 2 * 2
    assert pos[0].tolist() == list(range(8)) + [3, 4, 6, 7]
    # mask 1 of anchor 2 sees tokens 0..2 and itself; mask 2 also sees mask 1; nothing of the other group
    assert allowed[0, 8].nonzero().flatten().tolist() == [0, 1, 2, 8]
    assert allowed[0, 9].nonzero().flatten().tolist() == [0, 1, 2, 8, 9]
    assert allowed[0, 11].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5, 10, 11]
    assert allowed[0, :8, 8:].sum() == 0  # the window never sees a mask


def test_window_labels_are_the_tokens_ahead():
    seq = np.arange(100, 140)
    rng = np.random.default_rng(0)
    ids, where, labels, own = window_batch([seq], [(0, 3)], 20, 3, 4, rng, prompts=[10])
    assert ids[0].tolist() == list(range(103, 123))
    for j, a in enumerate(where[0].tolist()):
        assert labels[0, j].tolist() == [103 + a + 2, 103 + a + 3, 103 + a + 4]  # mask i: i + 1 places after a
    assert own[0].tolist() == [3 + t + 1 >= 10 for t in range(19)]  # window token t + 1 past the 10-token prompt


def test_one_forward_per_round_and_the_training_logits():
    drafter = tiny_llama(64, seed=2, layers=2, hidden=32)
    heads = random_heads(32)
    d = ParallelSpecDrafter(drafter, heads, 64)
    prompt = [3, 17, 42, 5, 9, 11, 20, 7]
    d.prefill(prompt)
    before = d.lm.forwards
    draft = d.propose(prompt, 4, FixedGamma(4), Sampling(), None)
    assert len(draft.tokens) == 4 and d.lm.forwards == before + 1
    # the drafting forward's logits are the training path's (same masks, positions and attention)
    ids = torch.tensor([prompt])
    where = torch.tensor([[len(prompt) - 1]])
    with torch.no_grad():
        train_logits = mask_logits(drafter, heads, ids, where)[0, 0]  # (M, V)
    d2 = ParallelSpecDrafter(drafter, heads, 64)
    d2.prefill(prompt)
    logits = d2.lm.forward(prompt + d2.mask_ids, n_logits=4)  # (4, V)
    torch.testing.assert_close(logits[1:], train_logits, atol=1e-4, rtol=1e-4)
    assert draft.tokens[1:] == train_logits.argmax(-1).tolist()
    # the next round feeds real tokens only: the mask entries are dropped from the cache
    committed = prompt + draft.tokens[:1] + [33]
    d.commit(committed, draft, None)
    d.propose(committed, 2, FixedGamma(2), Sampling(), None)
    assert d.lm.ids[: len(committed)] == committed and len(d.lm.ids) == len(committed) + 1


def test_gamma_is_capped_by_the_masks():
    drafter = tiny_llama(64, seed=2, layers=1, hidden=16)
    d = ParallelSpecDrafter(drafter, random_heads(16, n_masks=2), 64)
    d.prefill([1, 2, 3])
    assert len(d.propose([1, 2, 3], 8, FixedGamma(8), Sampling(), None).tokens) == 3
    assert len(d.propose([1, 2, 3], 1, FixedGamma(1), Sampling(), None).tokens) == 1


def test_the_masks_do_not_touch_the_shared_model():
    drafter = tiny_llama(64, seed=2, layers=1, hidden=16)
    embed = drafter.get_input_embeddings()
    ParallelSpecDrafter(drafter, random_heads(16), 64)
    assert drafter.get_input_embeddings() is embed and drafter.get_output_embeddings() is drafter.lm_head


def test_training_learns_tokens_ahead():
    """Sequences of one repeated token (a different one each): what lies two and three places ahead is in the context
    the masks read. The masks and blocks learn it in a few steps; the frozen drafter's own next-token row does not
    change. (A random one-layer drafter cannot learn a position-dependent pattern this quickly.)"""
    drafter = tiny_llama(16, seed=3, layers=1, hidden=32, scale=20.0)  # an output layer that can move
    g = np.random.default_rng(0)
    seqs = []
    for _ in range(16):
        seqs.append(np.full(48, int(g.integers(0, 16))))
    heads0 = MaskHeads(32, 2)
    before = held_out_accuracy(drafter, heads0, seqs, width=32, anchors=8, n=4)
    heads, report = fit(drafter, seqs, n_masks=2, width=32, anchors=8, batch=4, steps=150, lr=3e-2, mask_lr=1.0,
                         distill=0.0, progress=False)  # a random drafter is no teacher: labels only
    after = held_out_accuracy(drafter, heads, seqs, width=32, anchors=8, n=4)
    assert np.mean(report.losses[-5:]) < 0.5 * np.mean(report.losses[:5])
    assert after[0] == before[0]  # the drafter itself is frozen
    assert min(after[1:]) > max(before[1:]) + 0.5
    assert all(not p.requires_grad or p.grad is None for p in drafter.parameters())


def ctx_for(target, drafter, heads):
    return _Ctx(LoadedModel(target, None, "tiny-target"), LoadedModel(drafter, None, "tiny-drafter"), frozenset(),
                {"heads": heads})


def test_a_folder_loads_and_a_wrong_draft_model_is_refused(tmp_path):
    target = tiny_llama(64, seed=1)
    drafter = tiny_llama(64, seed=2, layers=1, hidden=16)
    heads = random_heads(16)
    cfg = {**heads.config(), "drafter": {"name": "tiny-drafter", "hidden_size": 16, "num_layers": 1}}
    path = save_drafter(tmp_path / "ps", "parallelspec", cfg, heads.state_dict(), "tiny-target", fingerprint(target))
    d = ParallelSpecDrafter.from_ctx(ctx_for(target, drafter, str(path)))
    torch.testing.assert_close(d.heads.masks, heads.masks)
    other = tiny_llama(64, seed=2, layers=2, hidden=16)
    with pytest.raises(ValueError, match="trained for draft model 'tiny-drafter'"):
        ParallelSpecDrafter.from_ctx(ctx_for(target, other, str(path)))
    with pytest.raises(ValueError, match="trained for target"):
        ParallelSpecDrafter.from_ctx(ctx_for(tiny_llama(64, seed=9), drafter, str(path)))
    with pytest.raises(ValueError, match="masks are 16 wide"):
        ParallelSpecDrafter(tiny_llama(64, seed=2, layers=1, hidden=32), heads, 64)


def test_the_teacher_is_the_drafter_at_the_real_position():
    """The distillation target of mask i is the drafter's own distribution at position a + i of the real window
    (what it predicts knowing the tokens in between), taken from the same forward."""
    drafter = tiny_llama(64, seed=2, layers=2, hidden=32)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    where = torch.tensor([[3, 10], [5, 12]])
    with torch.no_grad():
        _, real = mask_logits(drafter, random_heads(32, n_masks=3), ids, where, teacher=True)  # (B, W, V)
        teach = teacher_rows(real, where, 3)  # (B, A, M, V)
        full = drafter(input_ids=ids).logits  # (B, W, V)
    for b in range(2):
        for j in range(2):
            for i in range(3):
                torch.testing.assert_close(teach[b, j, i], full[b, int(where[b, j]) + i + 1], atol=1e-4, rtol=1e-4)


def test_train_and_generate_commands_end_to_end(folders, tmp_path, capsys):
    """`verispec train parallelspec` on local tiny models (a store of standard-library prompts, a few steps), then
    `verispec generate --method parallelspec` with that folder: greedy gives AR's tokens."""
    import json

    from verispec.cli import main

    t, d = str(folders / "t"), str(folders / "d")
    out, work = tmp_path / "masks", tmp_path / "work"
    assert main(["train", "parallelspec", "--target", t, "--drafter", d, "--prompts", "3", "--prompt-len", "16",
                 "--completion-len", "4", "--steps", "4", "--heads", "3", "--out", str(out),
                 "--workdir", str(work)]) == 0
    summary = json.loads((work / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["folder"] == str(out) and summary["drafts_per_forward"] == 3
    capsys.readouterr()
    base = ["generate", "--target", t, "--prompt", "w1 w2 w3", "--json", "--max-new-tokens", "8"]
    assert main(base + ["--method", "parallelspec", "--drafter", d, "--option", f"heads={out}"]) == 0
    ps = json.loads(capsys.readouterr().out)
    assert main(base) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == ps["token_ids"]
    assert ps["stats"]["method"] == "parallelspec"


def test_tuned_layers_train_and_draft_with_the_tuned_weights():
    """train_layers=1: only the last layer (and the heads) change; a drafter given that layer's state on the
    untouched model drafts with exactly the tuned model's logits (the layer replaced in its decoder only)."""
    import copy

    base = tiny_llama(16, seed=3, layers=2, hidden=32, scale=20.0)
    tuned_model = copy.deepcopy(base)
    g = np.random.default_rng(0)
    seqs = [np.full(48, int(g.integers(0, 16))) for _ in range(16)]
    heads, report = fit(tuned_model, seqs, n_masks=2, width=32, anchors=8, batch=4, steps=20, lr=1e-2,
                        distill=0.0, train_layers=1, layer_lr=1.0, progress=False)
    first, last = (tuned_model.model.layers[i].state_dict() for i in (0, 1))
    assert all(torch.equal(v, base.model.layers[0].state_dict()[k]) for k, v in first.items())
    assert any(not torch.equal(v, base.model.layers[1].state_dict()[k]) for k, v in last.items())
    d = ParallelSpecDrafter(base, heads, 16, tuned=[last])
    prompt = [int(t) for t in seqs[0][:10]]
    d.prefill(prompt)
    logits = d.lm.forward(prompt + d.mask_ids, n_logits=3)  # (3, V)
    with torch.no_grad():
        want = mask_logits(tuned_model, heads, torch.tensor([prompt]), torch.tensor([[9]]))[0, 0]  # (M, V)
        row0 = tuned_model(input_ids=torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(logits[1:], want, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(logits[0], row0, atol=1e-3, rtol=1e-3)
    assert base.model.layers[1] is not d.lm.lean.layers[1]  # the shared model keeps its own layer


def test_tuned_layers_on_the_gguf_backend_become_q8_0_blocks():
    """On a native model the tuned layer's linears are Q8_0 blocks of the tuned weights: close to the fp32 layer,
    the file's other layers untouched, the model object unchanged."""
    from verispec.backends.native import NativeLinear, to_native
    from verispec.drafters.parallelspec import tuned_layer
    from tests.test_native import _tiny

    fp32 = _tiny("qwen2", seed=4)
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in fp32.model.layers[1].state_dict().items()}
    native = to_native(_tiny("qwen2", seed=4))
    like = native.model.layers[1]
    layer = tuned_layer(like, state, native)
    assert native.model.layers[1] is like and like.self_attn.q_proj is not layer.self_attn.q_proj
    assert isinstance(layer.mlp.down_proj, NativeLinear) and layer.mlp.down_proj.type == "Q8_0"
    w = layer.self_attn.q_proj.weight  # the Q8_0 blocks, dequantized
    assert float((w - state["self_attn.q_proj.weight"]).abs().max()) < 0.02 * float(w.abs().max())
    fp32.model.layers[1].load_state_dict(state)
    heads = random_heads(256, n_masks=2)
    prompt = [3, 17, 42, 5, 9, 11, 20, 7]
    ref = ParallelSpecDrafter(fp32, heads, 64)
    got = ParallelSpecDrafter(native, heads, 64, tuned=[state])
    a = ref.lm.forward(prompt + ref.mask_ids, n_logits=3)  # (3, V)
    b = got.lm.forward(prompt + got.mask_ids, n_logits=3)
    assert float((a - b).abs().max()) < 0.1 * float(a.abs().max())  # Q8_0 and int8 activations, not bits
