"""Drafter folders (verispec.drafters.folder): a trained drafter is read, checked and quantized once per target and
reused by later requests, read again when the folder is replaced, and refused when a file is altered in place."""

from __future__ import annotations

import pytest
import torch

import verispec
from tests.conftest import tiny_llama
from verispec.drafters import folder
from verispec.drafters.eagle import EagleModel
from verispec.drafters.layer_skip import fingerprint
from verispec.drafters.medusa import MedusaHeads
from verispec.models import LoadedModel

PROMPT = [(3 * i) % 17 + 1 for i in range(12)]


@pytest.fixture(autouse=True)
def _fresh():
    folder.forget_prepared()
    yield
    folder.forget_prepared()


def counting(monkeypatch) -> list:
    calls = []
    real = folder.load_drafter

    def load(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(folder, "load_drafter", load)
    return calls


def medusa_folder(path, target, seed: int):
    torch.manual_seed(seed)
    heads = MedusaHeads(32, 2)
    for p in heads.parameters():  # non-zero heads, so two seeds draft differently
        torch.nn.init.normal_(p, std=0.5)
    return folder.save_drafter(path, "medusa", heads.config(), heads.tensors(), "tiny", fingerprint(target))


def test_a_folder_drafter_is_loaded_once_per_target_and_reused(tmp_path, monkeypatch):
    target = LoadedModel(tiny_llama(64, seed=7, hidden=32), None, "tiny")
    medusa_folder(tmp_path / "h", target.model, seed=1)
    calls = counting(monkeypatch)
    ar = verispec.generate(target.model, PROMPT, method="ar", max_new_tokens=16).token_ids
    outs = [verispec.generate(target, PROMPT, method="medusa", heads=str(tmp_path / "h"), max_new_tokens=16,
                              gamma=2) for _ in range(3)]
    assert len(calls) == 1
    assert all(o.token_ids == ar for o in outs)
    assert outs[0].stats.drafted == outs[2].stats.drafted  # the same drafter state each time, not a used one
    # another drafting-weights option is another prepared drafter
    verispec.generate(target, PROMPT, method="medusa", heads=str(tmp_path / "h"), weights="fp32", max_new_tokens=4)
    assert len(calls) == 2
    # another target (same weights, another object) gets its own
    other = LoadedModel(tiny_llama(64, seed=7, hidden=32), None, "tiny")
    verispec.generate(other, PROMPT, method="medusa", heads=str(tmp_path / "h"), max_new_tokens=4)
    assert len(calls) == 3


def test_a_replaced_folder_is_read_again_and_an_altered_one_refused(tmp_path, monkeypatch):
    target = LoadedModel(tiny_llama(64, seed=7, hidden=32), None, "tiny")
    medusa_folder(tmp_path / "h", target.model, seed=1)
    calls = counting(monkeypatch)
    a = verispec.generate(target, PROMPT, method="medusa", heads=str(tmp_path / "h"), max_new_tokens=16)
    medusa_folder(tmp_path / "h", target.model, seed=2)  # retrained: a new folder renamed into place
    b = verispec.generate(target, PROMPT, method="medusa", heads=str(tmp_path / "h"), max_new_tokens=16)
    assert len(calls) == 2
    assert a.token_ids == b.token_ids  # lossless either way
    w = tmp_path / "h" / folder.WEIGHTS
    w.write_bytes(w.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated or altered"):
        verispec.generate(target, PROMPT, method="medusa", heads=str(tmp_path / "h"), max_new_tokens=4)


def test_a_failed_build_caches_nothing(tmp_path, monkeypatch):
    target = LoadedModel(tiny_llama(64, seed=7, hidden=32), None, "tiny")
    medusa_folder(tmp_path / "h", target.model, seed=1)
    calls = []

    def build():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("interrupted")
        return "made"

    with pytest.raises(RuntimeError):
        folder.prepared(target, "medusa", tmp_path / "h", ("x",), build)
    assert folder.prepared(target, "medusa", tmp_path / "h", ("x",), build) == "made"
    assert folder.prepared(target, "medusa", tmp_path / "h", ("x",), build) == "made"
    assert len(calls) == 2


def test_an_eagle_folder_is_prepared_once(tmp_path, monkeypatch):
    target = LoadedModel(tiny_llama(64, seed=7, hidden=32), None, "tiny")
    model = EagleModel.new(target.model, fusion="eagle1")
    folder.save_drafter(tmp_path / "e", "eagle", model.config(), model.tensors(), "tiny", fingerprint(target.model))
    calls = counting(monkeypatch)
    ar = verispec.generate(target.model, PROMPT, method="ar", max_new_tokens=12).token_ids
    for _ in range(2):
        got = verispec.generate(target, PROMPT, method="eagle", heads=str(tmp_path / "e"), max_new_tokens=12)
        assert got.token_ids == ar
    assert len(calls) == 1
