"""Drafter folders: what `verispec train medusa|eagle|blockwise` writes and every trained drafter loads.

A folder holds `model.safetensors` (the drafter's own weights; never the target's), `config.json` (the kind, its
hyper-parameters and the target it was trained on: name and weights fingerprint) and `manifest.json` (every file's
size and sha256), written last, after an atomic rename of the whole folder into place. Loading checks the manifest
(a truncated or altered file is refused), the kind and the target: a drafter trained on another target's features
is refused with a clear error, since its heads would read hidden states they have never seen.

A drafter is named by path, or by name under `$VERISPEC_HOME/drafters/` (where `verispec train` puts it:
`<kind>-<target name>` by default).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Callable, TypeVar

import torch

WEIGHTS, CONFIG, MANIFEST = "model.safetensors", "config.json", "manifest.json"
T = TypeVar("T")


def drafters_root() -> Path:
    from verispec.home import cache_root

    return cache_root() / "drafters"


def default_name(kind: str, target_name: str) -> str:
    return f"{kind}-{target_name}".replace("/", "_")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_drafter(out: str | Path, kind: str, config: dict, tensors: dict[str, torch.Tensor], target_name: str,
                 target_fingerprint: str) -> Path:
    """Write a drafter folder at `out` (replacing one there): built in a temporary sibling, manifest last, then
    renamed into place, so a crash leaves the old folder or none, never half of one."""
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS))
        cfg = {"kind": kind, "target": {"name": target_name, "fingerprint": target_fingerprint}, **config}
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=1))
        files = {n: {"bytes": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)} for n in (WEIGHTS, CONFIG)}
        (tmp / MANIFEST).write_text(json.dumps({"format": "verispec-drafter/1", "files": files}, indent=1))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def resolve(source: str | Path) -> Path:
    """A path, or a name under the drafters folder."""
    p = Path(source).expanduser()
    if p.exists():
        return p
    named = drafters_root() / str(source)
    if named.exists():
        return named
    raise FileNotFoundError(f"no drafter folder {source!r} (neither a path nor a name under {drafters_root()}); "
                            "train one with `verispec train <kind> --target NAME`")


def load_drafter(source: str | Path, kind: str | tuple[str, ...], target_model: torch.nn.Module | None = None
                 ) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """(config, tensors, folder) of a checked drafter folder of `kind`, trained for `target_model` (when given)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = resolve(source)
    if not (path / MANIFEST).exists():
        raise ValueError(f"{path} is not a complete drafter folder (no {MANIFEST}: written by an interrupted run?)")
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        sizes = {n: (int(f["bytes"]), str(f["sha256"])) for n, f in files.items()}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"the manifest of {path} is corrupted ({e})") from e
    for n in (WEIGHTS, CONFIG):
        if n not in sizes:
            raise ValueError(f"the manifest of {path} does not list {n} (corrupted)")
        f = path / n
        if not f.exists():
            raise ValueError(f"{path} lacks {n}")
        if f.stat().st_size != sizes[n][0] or _sha256(f) != sizes[n][1]:
            raise ValueError(f"{f} does not match its manifest (truncated or altered); train or copy it again")
    cfg = json.loads((path / CONFIG).read_text())
    kinds = (kind,) if isinstance(kind, str) else kind
    if cfg.get("kind") not in kinds:
        raise ValueError(f"{path} holds a {cfg.get('kind')!r} drafter, not {' or '.join(kinds)}")
    if target_model is not None:
        from verispec.drafters.layer_skip import fingerprint

        want = cfg["target"]["fingerprint"]
        if fingerprint(target_model) != want:
            raise ValueError(f"{path} was trained for target {cfg['target']['name']!r} (weights fingerprint {want}); "
                             "this target's weights differ (another model or backend): its features would be "
                             "ones the drafter never saw. Train one for this target with `verispec train`.")
    try:
        tensors = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path / WEIGHTS} cannot be read ({e})") from e
    return cfg, tensors, path


# -- drafters prepared once per target --------------------------------------------------------------------------

PREPARED_PER_TARGET = 4  # prepared drafters kept per target model (least recently used dropped first)
_prepared: "weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()
_prepared_lock = threading.Lock()


def prepared(target, kind: str, source, variant: tuple, build: Callable[[], T]) -> T:
    """The drafter model `build()` makes from the folder `source` (a path or name; None: the default folder of `kind`
    for this target) for `target` (a LoadedModel), made once and reused by later requests; an object passed as
    `source` (not a folder) is built every time. Every `generate` call and every served request builds its drafter anew; reading, checking (sha256),
    binding and quantizing a trained drafter took ~4.5 s per request for EAGLE on the 1.5B target. The entry is
    keyed by the folder as it is on disk (inode, size and mtime of its three files: `save_drafter` replaces a folder
    by renaming a new one into place, so a retrained drafter is read again, and a file altered in place is checked
    again, and refused) and by `variant` (the options that change
    what `build` makes, e.g. the drafting weights). Entries live as long as the target model. `build` must return
    an object that drafting never changes (per-generation state lives in the drafter, not in this object); a build
    that raises caches nothing."""
    if isinstance(source, torch.nn.Module):
        return build()
    path = resolve(source if source is not None else default_name(kind, target.name))
    target_model = target.model
    try:
        stats = tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in (path.joinpath(n).stat()
                                                                     for n in (MANIFEST, CONFIG, WEIGHTS)))
    except OSError:
        return build()  # an incomplete folder: load_drafter's own error
    key = (str(path.resolve()), stats, kind, variant)
    with _prepared_lock:
        per = _prepared.setdefault(target_model, OrderedDict())
        if key in per:
            per.move_to_end(key)
            return per[key]
    obj = build()
    with _prepared_lock:
        per = _prepared.setdefault(target_model, OrderedDict())
        per[key] = obj
        per.move_to_end(key)
        while len(per) > PREPARED_PER_TARGET:
            per.popitem(last=False)
    return obj


def forget_prepared() -> None:
    """Drop every prepared drafter (tests; a process that wants the memory back)."""
    with _prepared_lock:
        _prepared.clear()
