"""Online speculative decoding (`osd`, `verispec.drafters.online`): lossless before and after an update, an update
that changes only the drafter and lowers the distillation loss, failed and interrupted updates that change nothing,
updates that never block a generation, versioned checkpoints, and the A/B bench on tiny saved models."""

from __future__ import annotations

import copy
import hashlib
import json
import threading
import time
from pathlib import Path

import pytest
import torch

import verispec
from verispec.api import _Ctx
from verispec.cache import CachedLM
from verispec.drafters.online import (OnlineDrafter, OnlineState, distill_loss, read_manifest, versions,
                                      version_dir)
from verispec.models import LoadedModel
from verispec.policies import FixedGamma
from verispec.sampling import Sampling
from verispec.verifiers import RejectionVerifier
from tests.conftest import tiny_llama
from tests.law import chi2_pvalue, draw, exact_law, min_detectable_tv, pooled_cells
from tests.test_contract import GREEDY_PROMPT, noisy_copy, recover_from_p

# Adapting fast on purpose (a learnable toy: a tiny random target's greedy loop), so that one update visibly moves
# the drafter. Every update runs inline (background=False) unless a test is about the thread.
FAST = dict(positions="all", lr=1e-2, steps=8, background=False)


def state_of(drafter: torch.nn.Module) -> OnlineState:
    from verispec.drafters.online import _STATES

    (s,) = _STATES[drafter].values()
    return s


def osd(target, drafter, prompt=GREEDY_PROMPT, n=48, **options):
    return verispec.generate(target, prompt, method="osd", drafter=drafter, max_new_tokens=n, **options)


@pytest.fixture
def world(tmp_path):
    target = tiny_llama(64, seed=1, scale=20.0)
    drafter = noisy_copy(target, 0.6, 4)
    ar = verispec.generate(target, GREEDY_PROMPT, method="ar", max_new_tokens=48).token_ids
    return target, drafter, ar, dict(FAST, checkpoint_dir=str(tmp_path / "ckpt"))


def weights(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- greedy: AR's tokens before and after; only the drafter changes; the loss goes down ----------------------------

def test_greedy_output_is_ar_before_and_after_an_update_and_only_the_drafter_changes(world):
    target, drafter, ar, opts = world
    t0, d0 = weights(target), weights(drafter)
    before = osd(target, drafter, update_every=1, **opts)  # request 1: the unadapted drafter
    after = osd(target, drafter, update_every=1, **opts)  # request 2: updated at its prefill, drafts with v1
    s = state_of(drafter)
    assert before.token_ids == ar and after.token_ids == ar
    assert s.current[0] == 1 and [h.status for h in s.history] == ["ok"]
    assert 0 < after.stats.accepted < after.stats.drafted
    assert after.stats.acceptance_rate > before.stats.acceptance_rate + 0.1  # it learned the target's loop
    h = s.history[0]
    assert h.steps == 8 and h.loss_after < 0.5 * h.loss_before  # the distillation loss, within 8 steps
    assert same(weights(target), t0)  # the target is bit-identical
    assert same(weights(drafter), d0)  # so is the drafter object passed in: training runs on a copy
    adapted = s.current[1]
    assert adapted is not drafter and not same(weights(adapted), d0)


def test_the_distances_are_zero_only_at_the_teacher():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 10, generator=g)  # (n, V)
    q = torch.softmax(logits, -1)
    p, ids = q.topk(10)  # the full law as the "top-k"
    for kind in ("fkl", "jsd"):
        assert abs(float(distill_loss(logits, ids, p, kind))) < 1e-5
        assert float(distill_loss(logits, ids[:, :3], torch.rand(5, 3, generator=g), kind)) > 1e-3
    with pytest.raises(ValueError, match="loss must be one of fkl, jsd"):
        verispec.generate(tiny_llama(64), [1, 2], method="osd", drafter=tiny_llama(64, seed=3), loss="rkl",
                          max_new_tokens=2, checkpoint_dir="none")


def test_jsd_updates_too(world):
    target, drafter, ar, opts = world
    for _ in range(2):
        assert osd(target, drafter, update_every=1, loss="jsd", **opts).token_ids == ar
    h = state_of(drafter).history[0]
    assert h.status == "ok" and h.loss_after < h.loss_before



def test_train_layers_adapts_the_last_blocks_only_on_stored_entry_states(tmp_path):
    """train_layers=1 on a 3-block drafter: AR's tokens before and after, the loss of the first pass equal to the
    full forward's (the stored entry states are the same stream), and only block 2 of the adapted drafter moves."""
    target = tiny_llama(64, seed=1, scale=20.0)
    drafter = noisy_copy(tiny_llama(64, seed=1, scale=20.0, layers=3), 0.6, 4)
    ar = verispec.generate(target, GREEDY_PROMPT, method="ar", max_new_tokens=48).token_ids
    runs = {}
    for N in (0, 1):
        d = copy.deepcopy(drafter)
        opts = dict(FAST, checkpoint_dir=str(tmp_path / f"ckpt{N}"), update_every=1, train_layers=N)
        assert osd(target, d, **opts).token_ids == ar
        assert osd(target, d, **opts).token_ids == ar
        runs[N] = state_of(d)
    full, last = runs[0].history[0], runs[1].history[0]
    assert last.status == "ok" and last.loss_after < last.loss_before
    assert last.loss_before == pytest.approx(full.loss_before, rel=1e-5)
    before, after = weights(drafter), weights(runs[1].current[1])
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("model.layers.2.") for k in moved), moved
    assert read_manifest(tmp_path / "ckpt1", 1)["lora"]["train_layers"] == 1
    with pytest.raises(ValueError, match="train_layers=3 must be below the drafter's 3 blocks"):
        osd(target, copy.deepcopy(drafter), **dict(FAST, checkpoint_dir="none", train_layers=3))

# -- sampling: the target's law before and after an update ---------------------------------------------------------

V, K, N_TOKENS = 4, 1, 2  # the contract suite covers K = 2 (with updates mid-draw); here a cheap K = 1 on 16 cells
LAW_PROMPT = [1, 2, 3, 1, 2, 3, 1, 2]
SAMPLING = Sampling(temperature=1.0, seed=3)
CHI2_N, NEGATIVE_N = 800, 800


@pytest.fixture(scope="module")
def law_world(tmp_path_factory):
    target = tiny_llama(V, seed=11, scale=4.0)
    drafter = tiny_llama(V, seed=13, layers=1, hidden=16, scale=8.0)  # accepted ~72% at the prompt
    # a moderate update (~79% after): the drafter moves toward the target and still rejects often enough for the
    # negative control to have something to catch
    opts = dict(FAST, lr=3e-3, steps=6, update_every=10**6, checkpoint_dir=str(tmp_path_factory.mktemp("law") / "ckpt"))
    for seed in range(40):  # sampled requests fill the buffer; then one update
        verispec.generate(target, LAW_PROMPT, method="osd", drafter=drafter, max_new_tokens=8,
                          sampling=Sampling(temperature=1.0, seed=seed), gamma=K, **opts)
    s = state_of(drafter)
    assert s.update(drafter, wait=True) and s.current[0] == 1
    return target, drafter, exact_law(target, LAW_PROMPT, N_TOKENS, SAMPLING), opts, {}


def job(target, drafter, opts, version, verifier=RejectionVerifier):
    t, d = LoadedModel(target, None, "tiny-target"), LoadedModel(drafter, None, "tiny-drafter")
    frozen = {**opts, "learn": False, **({"version": version} if version is not None else {})}
    return lambda: (CachedLM(target), OnlineDrafter.from_ctx(_Ctx(t, d, frozenset(), frozen)), verifier(),
                    FixedGamma(K))


@pytest.mark.parametrize("version", [0, None], ids=["before", "after"])
def test_samples_follow_the_target_before_and_after_an_update(law_world, version):
    """χ² of 2-token generations at K = 1 against the exact law, with the unadapted drafter (version=0) and the
    adapted one (the state's current version); n = 800 draws, 16 cells: min detectable TV < 0.12 (α = 1e-3, power
    0.9; test_the_law_test_has_power)."""
    target, drafter, law, opts, acceptance = law_world
    counts, rounds = draw(job(target, drafter, opts, version), CHI2_N, seed=5, n_tokens=N_TOKENS, sampling=SAMPLING,
                          prompt=LAW_PROMPT)
    assert rounds.accepted_at(K) > CHI2_N // 10 and rounds.rejected_at(K) > CHI2_N // 10
    assert chi2_pvalue(counts, law) > 1e-3
    acceptance[version] = rounds.accepted_at(1) / rounds.drafted(1)


def test_the_adapted_drafter_is_accepted_more_and_a_biased_recovery_is_caught(law_world):
    target, drafter, law, opts, acc = law_world
    if len(acc) == 2:
        assert acc[None] > acc[0]  # the update moved the drafter toward the target
    counts, rounds = draw(job(target, drafter, opts, None, recover_from_p(RejectionVerifier)), NEGATIVE_N, seed=6,
                          n_tokens=N_TOKENS, sampling=SAMPLING, prompt=LAW_PROMPT)
    assert rounds.rejected_at(1) > NEGATIVE_N // 10  # still rejecting: the control has something to catch
    assert chi2_pvalue(counts, law) < 1e-6  # ~1e-8 at 800 draws


def test_the_law_test_has_power(law_world):
    cells = pooled_cells(law_world[2], CHI2_N)
    assert cells == 16 and min_detectable_tv(CHI2_N, cells) < 0.12


# -- failures, interruptions, the thread ------------------------------------------------------------------------

def lora(s: OnlineState) -> list[torch.Tensor]:
    return [q.detach().clone() for q in s._peft.parameters() if q.requires_grad]


def test_a_failed_update_leaves_the_previous_drafter_and_no_checkpoint(world, monkeypatch):
    target, drafter, ar, opts = world
    osd(target, drafter, update_every=1, **opts)
    osd(target, drafter, update_every=1, **opts)  # v1
    s = state_of(drafter)
    v1, w1, root = s.current[1], lora(s), opts["checkpoint_dir"]
    calls = []

    def broken(self, *a):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected")
        return real(self, *a)

    real = OnlineState._step
    monkeypatch.setattr(OnlineState, "_step", broken)
    buffered = s.buffered
    assert osd(target, drafter, update_every=1, **opts).token_ids == ar  # the update at this prefill fails
    h = s.history[-1]
    assert h.status == "failed" and "injected" in h.error and h.steps == 2
    assert s.current == (1, v1) and all(torch.equal(a, b) for a, b in zip(lora(s), w1))  # LoRA weights restored
    assert versions(root) == [1] and [p.name for p in Path(root).iterdir()] == ["v0001"]  # no half checkpoint
    assert s.buffered >= buffered  # the positions went back to the buffer
    # a failure while writing the checkpoint: nothing published, no temporary folder left
    monkeypatch.setattr(OnlineState, "_step", real)
    def full_disk(path):
        raise OSError("disk full")

    monkeypatch.setattr("verispec.drafters.online._sha256", full_disk)  # called after the adapter file is written
    osd(target, drafter, update_every=1, **opts)
    assert s.history[-1].status == "failed" and "disk full" in s.history[-1].error
    assert s.current == (1, v1) and [p.name for p in Path(root).iterdir()] == ["v0001"]
    monkeypatch.undo()
    assert osd(target, drafter, update_every=1, **opts).token_ids == ar  # and the next update works
    assert s.current[0] == 2 and versions(root) == [1, 2]


def blocking_step(release: threading.Event, started: threading.Event):
    real = OnlineState._step

    def step(self, *a):
        started.set()
        while not (release.is_set() or self._stop.is_set()):
            time.sleep(0.005)
        return real(self, *a)

    return step


def test_updates_run_in_the_background_and_an_interrupted_one_changes_nothing(world, monkeypatch):
    target, drafter, ar, opts = world
    opts = dict(opts, background=True, update_every=1)
    release, started = threading.Event(), threading.Event()
    monkeypatch.setattr(OnlineState, "_step", blocking_step(release, started))
    osd(target, drafter, **opts)
    osd(target, drafter, **opts)  # launches update 1, which blocks in its first step
    s = state_of(drafter)
    assert started.wait(10) and s.busy
    out = osd(target, drafter, **opts)  # a generation while the update runs: not blocked, drafts with v0
    assert out.token_ids == ar and s.busy and s.current[0] == 0
    s.interrupt(timeout=10)
    assert not s.busy and s.history[-1].status == "interrupted" and s.current == (0, None)
    assert not Path(opts["checkpoint_dir"]).exists() or not any(Path(opts["checkpoint_dir"]).iterdir())
    release.set()
    osd(target, drafter, **opts)  # launches update 2 (not blocked now)
    s.wait(30)
    assert s.history[-1].status == "ok" and s.current[0] == 1
    assert osd(target, drafter, **opts).token_ids == ar  # drafts with v1 from its first round


# -- checkpoints ------------------------------------------------------------------------------------------------

def test_checkpoints_are_versioned_with_a_manifest_and_reload(world):
    target, drafter, ar, opts = world
    pristine = copy.deepcopy(drafter)  # another object: a fresh state, as after a restart
    for _ in range(3):
        osd(target, drafter, update_every=1, **opts)  # v1 at request 2, v2 at request 3
    s, root = state_of(drafter), opts["checkpoint_dir"]
    assert versions(root) == [1, 2]
    m = read_manifest(root, 2)
    assert m["version"] == 2 and m["parent"] == 1 and m["lora"]["r"] == 8 and m["training"]["loss"] == "fkl"
    assert m["base"]["vocab_size"] == 64 and m["training"]["positions_used"] > 0
    for name, digest in m["files"].items():
        assert hashlib.sha256((version_dir(root, 2) / name).read_bytes()).hexdigest() == digest
    assert json.loads((version_dir(root, 2) / "adapter_config.json").read_text())["r"] == 8
    # reload: the latest version on a fresh drafter object drafts with bit-identical weights
    out = osd(target, pristine, learn=False, version="latest", **opts)
    r = state_of(pristine)
    assert out.token_ids == ar and r.current[0] == 2 and same(weights(r.current[1]), weights(s.current[1]))
    osd(target, pristine, learn=False, version=1, **opts)  # a pin: v1
    assert r.current[0] == 1
    out = osd(target, pristine, learn=False, version=0, **opts)  # the unadapted drafter, state untouched
    assert out.token_ids == ar and r.current[0] == 1
    with pytest.raises(ValueError, match="learn=False"):
        osd(target, pristine, version=0, **opts)
    other = tiny_llama(64, seed=5, layers=1, hidden=16)  # another drafter shape: refused
    with pytest.raises(ValueError, match="trained on another drafter"):
        osd(target, other, learn=False, version=2, **opts)


def test_states_are_per_drafter_object_and_config(world):
    target, drafter, ar, opts = world
    osd(target, drafter, n=4, **opts)
    osd(target, drafter, n=4, **{**opts, "steps": 2})
    from verispec.drafters.online import _STATES

    assert len(_STATES[drafter]) == 2
    copy.deepcopy(drafter)  # nothing unpicklable was put on the model
    assert "_verispec_osd" not in vars(drafter)


# -- the A/B bench on tiny saved models ----------------------------------------------------------------------------

def test_osd_bench_ab_end_to_end(folders, capsys):
    from verispec.cli import main

    data = folders / "stream.jsonl"
    data.write_text("\n".join(json.dumps({"id": f"s{i}", "prompt": " ".join(f"w{(i * 5 + j) % 60}" for j in range(6))})
                              for i in range(6)))
    out = folders / "osd"
    rc = main(["bench", "--osd", "--osd-adapt", "3", "--osd-eval", "2", "--target", str(folders / "t"),
               "--drafter", str(folders / "d"), "--dataset", str(data), "--max-new-tokens", "12", "--out", str(out),
               "--no-warmup", "--osd-option", "update_every=1", "--osd-option", "lr=0.01"])
    assert rc == 0
    s = json.loads((out / "osd.json").read_text())
    assert not set(s["config"]["adapt_ids"]) & set(s["config"]["eval_ids"]) and len(s["config"]["eval_ids"]) == 2
    assert s["identity_violations"] == [] and s["A"]["drafted"] > 0 and s["B"]["drafted"] > 0
    t = s["training"]
    assert t["updates"] >= 1 and t["positions"] > 0 and t["steps"] > 0 and t["seconds"] > 0
    assert s["checkpoint"]["version"] == versions(out / "osd-checkpoints")[-1]
    assert s["checkpoint"]["manifest"]["version"] == s["checkpoint"]["version"]
    assert s["backends"]["adapted_drafter"] == s["backends"]["drafter"]  # converted like the drafter it replaces
    md = (out / "osd.md").read_text()
    assert "A: unadapted drafter" in md and "Training budget" in md and "Machine:" in md
    assert main(["bench", "--osd", "--osd-adapt", "5", "--osd-eval", "2", "--target", str(folders / "t"),
                 "--drafter", str(folders / "d"), "--dataset", str(data), "--out", str(out)]) == 2
    assert "6 distinct prompts" in capsys.readouterr().err  # refused before any model is loaded
