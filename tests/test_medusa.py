"""Medusa heads: tree compilation, the sparse tree, training lowers the loss on a learnable pattern, the drafter
folder round trip and its refusals, resumable training, typical acceptance reported lossy, and a trained drafter
that gets drafts accepted while its output stays the target's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import verispec
from tests.conftest import tiny_llama
from verispec.drafters import medusa
from verispec.drafters.folder import load_drafter, save_drafter
from verispec.drafters.medusa import MedusaHeads, compile_tree, sparse_tree
from verispec.models import LoadedModel


def test_compile_tree_matches_a_hand_built_example():
    plan = compile_tree([(1,), (0,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])
    assert plan.paths == ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))
    assert plan.parents == (-1, -1, 0, 0, 1, 2)
    assert plan.depth == (1, 1, 2, 2, 2, 3)
    assert plan.rank == (0, 1, 0, 1, 0, 0)
    want = torch.tensor([[1, 0, 0, 0, 0, 0],
                         [0, 1, 0, 0, 0, 0],
                         [1, 0, 1, 0, 0, 0],
                         [1, 0, 0, 1, 0, 0],
                         [0, 1, 0, 0, 1, 0],
                         [1, 0, 1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(plan.mask, want)
    assert set(plan.retrieve) == {(0, 2, 5), (0, 3), (1, 4)}
    assert plan.upto(1) == [0, 1]


def test_compile_tree_refuses_disconnected_choices():
    with pytest.raises(ValueError, match="no parent"):
        compile_tree([(0,), (1, 0)])
    with pytest.raises(ValueError, match="non-empty"):
        compile_tree([])


def test_sparse_tree_takes_the_most_probable_connected_paths():
    acc = np.array([[0.6, 0.2], [0.5, 0.1]])
    paths = sparse_tree(acc, 4)
    assert paths == [(0,), (0, 0), (1,), (1, 0)]  # 0.6, 0.3, 0.2, 0.1 (then (0, 1): 0.06)
    compile_tree(paths)  # connected


def pattern_world(tmp_path, n_seq: int = 12, length: int = 40, own: bool = False):
    """A feature store whose tokens follow a fixed cycle: head k can learn token t+k+1 from the hidden state. own=True:
    12 cycle tokens, then what the target itself writes after them greedily (self-distillation, as `verispec train`
    does), so trained heads draft what the target will say."""
    from verispec.distill import STORE_FILE
    from verispec.drafters.layer_skip import fingerprint

    target = tiny_llama(64, seed=7, hidden=32)
    store = tmp_path / "store"
    store.mkdir()
    shards = []
    lm = verispec.cache.CachedLM(target)
    for s in range(n_seq):
        seq = [(3 * (i + s)) % 17 + 1 for i in range(length)]
        if own:
            seq = seq[:12] + verispec.generate(target, seq[:12], method="ar", max_new_tokens=length - 12).token_ids
        lm.track_features(("final",))
        lm.reset()
        lm.prefill(seq)
        np.save(store / f"shard-{s:05d}.tokens.npy", np.asarray(seq, dtype=np.int32))
        np.save(store / f"shard-{s:05d}.features.npy", lm.features.to(torch.float16).numpy())
        lm.untrack_features()
        shards.append({"file": f"shard-{s:05d}", "tokens": length, "prompt": length})
    (store / STORE_FILE).write_text(json.dumps({"target": "tiny", "fingerprint": fingerprint(target),
                                                "spec": ["final"], "width": 32, "shards": shards}))
    return LoadedModel(target, None, "tiny"), store


def test_training_lowers_the_loss_and_writes_a_loadable_folder(tmp_path):
    target, store = pattern_world(tmp_path)
    out = medusa.train_heads(target, store, tmp_path / "heads", n_heads=3, draft_vocab=None, steps=120, batch=32,
                             lr=3e-2, workdir=tmp_path / "work", progress=False)
    assert out["loss_last"] < 0.5 * out["loss_first"]
    assert out["top1_accuracy"][0] > 0.5  # the cycle is learnable from the hidden state
    assert (tmp_path / "work" / "loss.png").stat().st_size > 0
    cfg, tensors, _ = load_drafter(tmp_path / "heads", "medusa", target.model)
    assert cfg["num_heads"] == 3 and cfg["tree"]
    heads = MedusaHeads.from_tensors(cfg, tensors)
    for a, b in zip(heads.state_dict().values(), out["heads"].state_dict().values()):
        assert torch.equal(a, b)
    # drafting with it: greedy output is AR's, and the heads' drafts are accepted
    prompt = [(3 * i) % 17 + 1 for i in range(12)]
    ar = verispec.generate(target.model, prompt, method="ar", max_new_tokens=24).token_ids
    got = verispec.generate(target, prompt, method="medusa", heads=str(tmp_path / "heads"), max_new_tokens=24,
                            gamma=3)
    assert got.token_ids == ar
    assert got.stats.accepted > 0


def test_resumed_training_ends_in_the_state_of_an_uninterrupted_run(tmp_path):
    target, store = pattern_world(tmp_path, n_seq=4, length=20)
    kw = dict(n_heads=2, draft_vocab=16, batch=8, lr=1e-3, progress=False, out=None)
    full = medusa.train_heads(target, store, steps=12, workdir=tmp_path / "a", **kw)
    medusa.train_heads(target, store, steps=12, workdir=tmp_path / "b", tokens=6 * 8, **kw)  # stops at step 6
    resumed = medusa.train_heads(target, store, steps=12, workdir=tmp_path / "b", **kw)
    assert resumed["resumed_from"] == 6
    for a, b in zip(full["heads"].state_dict().values(), resumed["heads"].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_folder_refuses_wrong_target_truncation_and_a_corrupted_manifest(tmp_path):
    target = tiny_llama(64, seed=7)
    heads = MedusaHeads(32, 2)
    save_drafter(tmp_path / "h", "medusa", heads.config(), heads.tensors(), "tiny", "0" * 16)
    with pytest.raises(ValueError, match="trained for target"):
        load_drafter(tmp_path / "h", "medusa", target)
    with pytest.raises(ValueError, match="not 'eagle'|holds a 'medusa'"):
        load_drafter(tmp_path / "h", "eagle")
    w = tmp_path / "h" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated or altered"):
        load_drafter(tmp_path / "h", "medusa")
    save_drafter(tmp_path / "h", "medusa", heads.config(), heads.tensors(), "tiny", "0" * 16)
    (tmp_path / "h" / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest .* corrupted"):
        load_drafter(tmp_path / "h", "medusa")
    (tmp_path / "h" / "manifest.json").unlink()
    with pytest.raises(ValueError, match="not a complete drafter folder"):
        load_drafter(tmp_path / "h", "medusa")
    with pytest.raises(FileNotFoundError, match="verispec train"):
        load_drafter(tmp_path / "nothing", "medusa")


def test_typical_acceptance_is_reported_lossy():
    from verispec.registry import VERIFIERS
    from verispec.sampling import Sampling

    assert not VERIFIERS["typical-lossy"].lossless and "lossy" in VERIFIERS["typical-lossy"].name
    target = tiny_llama(64, seed=7)
    heads = MedusaHeads(32, 2)
    out = verispec.generate(target, [1, 2, 3, 4], method="medusa", heads=heads, verifier="typical-lossy",
                            sampling=Sampling(temperature=0.7, seed=1), max_new_tokens=8)
    assert "lossy" in out.stats.method


def test_typical_threshold_follows_medusa():
    from verispec.verifiers.typical import TypicalVerifier

    v = TypicalVerifier()
    flat = torch.full((8,), 1 / 8)
    assert v.threshold(flat) == pytest.approx(min(0.09, 0.3 * np.exp(-np.log(8))))
    assert v.threshold(torch.tensor([1.0, 0, 0])) == pytest.approx(0.09)


class VllmMedusaShape(torch.nn.Module):
    """The module structure vLLM's Medusa loads (vllm/model_executor/models/medusa.py: `blocks[h].layers[l]` linears
    with bias when `medusa_fc_bias`, one `lm_head` shared by every head when `original_lm_head`), to load an export
    strictly: every name and shape must match."""

    def __init__(self, cfg: dict):
        super().__init__()
        H = cfg["hidden_size"]
        self.blocks = torch.nn.ModuleList(
            torch.nn.Module() for _ in range(cfg["num_heads"]))
        for b in self.blocks:
            b.layers = torch.nn.ModuleList(torch.nn.Linear(H, H, bias=cfg["medusa_fc_bias"])
                                           for _ in range(cfg["num_hidden_layers"]))
        self.lm_heads = torch.nn.ModuleList([torch.nn.Linear(H, cfg["truncated_vocab_size"], bias=False)])


def test_vllm_export_has_the_fields_and_shapes_vllm_reads(tmp_path):
    from safetensors.torch import load_file

    from verispec.export import export_vllm

    target = tiny_llama(64, seed=7)
    torch.manual_seed(1)
    heads = MedusaHeads(32, 3, 1, vocab_ids=torch.tensor([1, 4, 9, 20]))
    from verispec.drafters.layer_skip import fingerprint

    save_drafter(tmp_path / "h", "medusa", heads.config(), heads.tensors(), "tiny", fingerprint(target))
    out = export_vllm(tmp_path / "h", tmp_path / "vllm", LoadedModel(target, None, "tiny"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["MedusaModel"] and cfg["model_type"] == "medusa"
    assert (cfg["hidden_size"], cfg["vocab_size"], cfg["num_heads"], cfg["num_hidden_layers"],
            cfg["truncated_vocab_size"]) == (32, 64, 3, 1, 4)
    t = load_file(str(out / "model.safetensors"))
    token_map = t.pop("token_map")
    assert token_map.dtype == torch.int64 and token_map.tolist() == [1, 4, 9, 20]
    VllmMedusaShape(cfg).load_state_dict(t, strict=True)  # names and shapes as vLLM's module has them
    torch.testing.assert_close(t["lm_heads.0.weight"], target.lm_head.weight[token_map])
    torch.testing.assert_close(t["blocks.1.layers.0.weight"], heads.heads[1][0].linear.weight)
    with pytest.raises(ValueError, match="exists"):
        export_vllm(tmp_path / "h", tmp_path / "vllm", LoadedModel(target, None, "tiny"))


def test_train_and_generate_commands_end_to_end(folders, tmp_path, capsys):
    """`verispec train medusa` on a local tiny model (store from standard-library prompts, a few steps), then
    `verispec generate --drafter medusa:FOLDER` (greedy: AR's tokens) and `verispec export vllm`."""
    from verispec.cli import main, trained_drafter

    t = str(folders / "t")
    out, work = tmp_path / "heads", tmp_path / "work"
    assert main(["train", "medusa", "--target", t, "--prompts", "3", "--prompt-len", "16", "--completion-len", "4",
                 "--steps", "6", "--batch", "8", "--draft-vocab", "0", "--heads", "2", "--out", str(out),
                 "--workdir", str(work)]) == 0
    summary = json.loads((work / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["folder"] == str(out) and summary["store_tokens"] == 3 * 19
    capsys.readouterr()
    assert main(["generate", "--target", t, "--drafter", f"medusa:{out}", "--prompt", "w1 w2 w3", "--json",
                 "--max-new-tokens", "6"]) == 0
    med = json.loads(capsys.readouterr().out)
    assert main(["generate", "--target", t, "--prompt", "w1 w2 w3", "--json", "--max-new-tokens", "6"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == med["token_ids"]
    assert med["stats"]["method"] == "medusa"
    assert main(["export", "vllm", str(out), str(tmp_path / "v"), "--target", t]) == 0
    assert "--speculative-config" in capsys.readouterr().out
    opts: dict = {}
    assert trained_drafter("qwen2.5-coder-0.5b", None, opts) == ("qwen2.5-coder-0.5b", None) and not opts
    with pytest.raises(ValueError, match="but --method is sd"):
        trained_drafter("medusa:x", "sd", {})
