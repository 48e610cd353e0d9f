"""Self-distillation data for trained drafters (Medusa, EAGLE, blockwise heads): the target's own text and features.

A *feature store* is a folder of shards. Each shard holds one sequence: `tokens` (T,) int32 and `features`
(T, F) float16 (two .npy files), row i the target's hidden states after tokens[:i + 1] (`verispec.features`),
memory-mapped on read so epochs re-read features instead of re-running the target. Sequences are a prompt from a
corpus the benchmark never uses (Python standard-library source without test files and without the files the
benchmark's prose and code-edit prompts come from) followed by the target's own completion
of it, greedy or sampled (T = 0.7), so the heads learn what *this* target says after what it reads. `store.json`
(the target's fingerprint, the feature names, per-shard sizes) is written last, after every shard: a store
without it is incomplete and refused.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from verispec.cache import CachedLM
from verispec.drafters.base import NoDrafter

STORE_FILE = "store.json"


def corpus_prompts(tokenizer, n: int, length: int, seed: int = 0, corpus: str = "stdlib") -> list[list[int]]:
    """n prompts of `length` tokens: windows from random files of the corpus, reproducible. Test files are skipped,
    and `stdlib` itself leaves out the files the benchmark's prompts are cut from (`corpus_files`)."""
    from verispec.datastore import _read_text, corpus_files

    files = [f for f in corpus_files(corpus) if "test" not in f.parts and "tests" not in f.parts]
    rng = random.Random(seed)
    rng.shuffle(files)
    out: list[list[int]] = []
    for f in files:
        text = _read_text(f)
        if not text or len(text) < 4 * length:
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < length + 8:
            continue
        at = rng.randrange(0, len(ids) - length)
        out.append(ids[at: at + length])
        if len(out) == n:
            break
    if not out:
        raise ValueError(f"no prompts of {length} tokens found in corpus {corpus!r}")
    return out


class _Recorder(NoDrafter):
    """Plain AR decoding (no drafts) that keeps the target features the engine hands over: one pass over each
    sequence gives its tokens and features (no second forward)."""

    def __init__(self, spec):
        self.target_features = tuple(spec)
        self.features = None

    def take_features(self, f):
        self.features = f  # a view of the cache's rows; final once the generation ends


@dataclass
class StoreInfo:
    path: Path
    target: str
    fingerprint: str
    spec: tuple
    width: int
    shards: list[dict]  # {"file": name, "tokens": T, "prompt": P}

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)


def build_store(target, out: str | Path, spec=("final",), *, prompts: int = 64, prompt_len: int = 96,
                completion_len: int = 64, sampled_share: float = 0.5, seed: int = 0, minutes: float | None = None,
                tokens: int | None = None, corpus: str = "stdlib",
                progress: Callable[[str], None] | None = None) -> StoreInfo:
    """Generate the store: for each corpus prompt, the target's completion (greedy, or sampled at T = 0.7 for a
    `sampled_share` of prompts), then one forward over prompt + completion with the feature tap on. Stops early at
    the `minutes` / `tokens` budget (what was written is a complete, smaller store)."""
    from verispec.drafters.layer_skip import fingerprint
    from verispec.engine import decode
    from verispec.models.load import load_model
    from verispec.policies.fixed import FixedGamma
    from verispec.sampling import Sampling
    from verispec.verifiers.rejection import RejectionVerifier

    target = load_model(target)
    if target.tokenizer is None:
        raise ValueError("building a feature store needs the target's tokenizer (to read the corpus)")
    out = Path(out)
    if (out / STORE_FILE).exists():
        raise ValueError(f"{out} already holds a feature store; remove it or choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    t0 = time.perf_counter()
    lm = CachedLM(target.model)
    shards: list[dict] = []
    total = 0
    for i, prompt in enumerate(corpus_prompts(target.tokenizer, prompts, prompt_len, seed, corpus)):
        sampled = rng.random() < sampled_share
        sampling = Sampling(temperature=0.7, seed=seed * 100003 + i) if sampled else Sampling()
        gen = torch.Generator().manual_seed(sampling.seed)
        rec = _Recorder(spec)
        new, _ = decode(lm, rec, RejectionVerifier(), FixedGamma(1), prompt, max_new_tokens=completion_len,
                        sampling=sampling, stop_ids=target.stop_ids, method="ar", generator=gen)
        seq = (prompt + new)[:-1]  # the newest token was never fed: it has no features
        feats = rec.features.to(torch.float16).numpy()  # (T, F), the features AR decoding computed anyway
        assert feats.shape[0] == len(seq)
        name = f"shard-{i:05d}"
        np.save(out / f"{name}.tokens.npy", np.asarray(seq, dtype=np.int32))
        np.save(out / f"{name}.features.npy", feats)
        shards.append({"file": name, "tokens": len(seq), "prompt": len(prompt), "sampled": sampled})
        total += len(seq)
        if progress:
            rate = total / max(time.perf_counter() - t0, 1e-9)
            progress(f"store: {i + 1} sequences, {total} tokens ({rate:.1f} tok/s)")
        if (minutes is not None and time.perf_counter() - t0 > 60 * minutes) or (tokens is not None
                                                                               and total >= tokens):
            break
    meta = {"target": target.name, "fingerprint": fingerprint(target.model), "spec": list(spec),
            "width": int(feats.shape[1]), "shards": shards, "corpus": corpus, "seed": seed,
            "seconds": round(time.perf_counter() - t0, 1)}
    (out / STORE_FILE).write_text(json.dumps(meta, indent=1))  # last: a store without it is incomplete
    return open_store(out)


def open_store(path: str | Path) -> StoreInfo:
    path = Path(path)
    meta_path = path / STORE_FILE
    if not meta_path.exists():
        raise ValueError(f"{path} is not a complete feature store (no {STORE_FILE}: interrupted while building?)")
    try:
        meta = json.loads(meta_path.read_text())
        info = StoreInfo(path, meta["target"], meta["fingerprint"], tuple(meta["spec"]), int(meta["width"]),
                         list(meta["shards"]))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"the feature store {path} is corrupted ({e})") from e
    for s in info.shards:
        for part in ("tokens", "features"):
            if not (path / f"{s['file']}.{part}.npy").exists():
                raise ValueError(f"the feature store {path} lacks shard file {s['file']}.{part}.npy")
    return info


def open_store_for(target, store) -> tuple:
    """(LoadedModel, StoreInfo, fingerprint) of a store this target made; another target's store is refused."""
    from verispec.drafters.layer_skip import fingerprint
    from verispec.models.load import load_model

    target = load_model(target)
    info = open_store(store)
    fp = fingerprint(target.model)
    if info.fingerprint != fp:
        raise ValueError(f"the feature store {info.path} was made by target {info.target!r} (fingerprint "
                         f"{info.fingerprint}), not this one ({fp})")
    return target, info, fp


def load_sequences(info: StoreInfo) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every shard's (tokens (T,), features (T, F)), memory-mapped: epochs read rows from disk, not the target."""
    out = []
    for s in info.shards:
        try:
            tokens = np.load(info.path / f"{s['file']}.tokens.npy", mmap_mode="r")
            feats = np.load(info.path / f"{s['file']}.features.npy", mmap_mode="r")
        except (OSError, ValueError) as e:
            raise ValueError(f"shard {s['file']} of {info.path} cannot be read (corrupted: {e})") from e
        if tokens.shape[0] != s["tokens"] or feats.shape != (s["tokens"], info.width):
            raise ValueError(f"shard {s['file']} of {info.path} does not match store.json (corrupted)")
        out.append((tokens, feats))
    return out
