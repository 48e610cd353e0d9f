"""The REST datastore: a tokenized corpus plus its suffix array, for exact-match retrieval of draft continuations.

He et al. 2024, "REST: Retrieval-Based Speculative Decoding" (NAACL 2024). REST keeps a corpus C as one token
array with a suffix array over it. At each step the query is the context's suffix of length n, tried from n_max
down to n_min (the longest suffix that occurs at all wins, because longer matches predict better); every
occurrence yields the up-to-γ tokens that follow it, and the retrieved continuations are merged into a trie whose
nodes count how many continuations pass through them. REST then verifies a pruned tree; verispec has no tree
verification yet, so `Retrieval.chain()` keeps the single most frequent path (most frequent child, level by
level).

Storage: one token array `T` (int32, N entries): each document's token ids followed by the separator `SEP = -1`.
A separator outside the vocabulary can never match a context token nor be proposed, so no retrieved
continuation crosses a document boundary. `SA` (int32, N) lists the suffix start positions of T in
lexicographic order (a shorter suffix sorts before a longer one it is a prefix of).

Suffix array construction is prefix doubling (Manber & Myers 1993) with numpy, refined as in Larsson & Sadakane
(2007): after the round with step k every suffix carries the rank of its first 2k tokens, and the next round sorts
only the suffixes still tied, by the pair (rank[i], rank[i + k]) packed into one int64 key. There are
ceil(log2(L + 1)) rounds for a longest repeat of L tokens; the first rounds sort all N suffixes (O(N log N) each),
later ones only the tied few. Time O(N log N log L) at worst, memory ~6 int64 arrays of N. Measured here (2 shared
cores, busy with other jobs): Python 3.11's standard library, 1,762 files = 7.88 M Qwen2.5 tokens, needs 13 rounds
(it repeats runs of 2-4 k tokens); the suffix array takes 9-10 s (20 s without the refinement), tokenizing 36-42 s,
the whole build ~60 s and 1.5 GB peak memory; the file is 63 MB (8 bytes a token) and loads in 0.04 s.

File format: one uncompressed `.npz` holding `tokens` (int32, N), `sa` (int32, N) and `header` (a JSON string):
format/version, the tokenizer's identity (vocab size + sha256 of the (token, id) list sorted by id), separator,
counts, sources and build time. A datastore built with another tokenizer is refused (`DatastoreMismatchError`).
Saving writes a temporary file in the destination folder and renames it, so a failed build leaves nothing behind.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import sysconfig
import tempfile
import time
import weakref
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "verispec-rest-datastore"
VERSION = 1
SEP = -1  # document separator: outside every vocabulary, so it never matches nor gets proposed


class DatastoreError(ValueError):
    """A datastore file is missing, unreadable or not a verispec REST datastore."""


class DatastoreMismatchError(DatastoreError):
    """The datastore was built with a tokenizer other than the model's: its token ids mean other tokens."""


# ----------------------------------------------------------------------------------------------- suffix array


def _tied(first: np.ndarray) -> np.ndarray:
    """Rows in groups of size > 1, given `first` marking each group's first row. (n,) bool -> (n,) bool."""
    gid = np.cumsum(first) - 1  # (n,) group id of each row
    return np.bincount(gid)[gid] > 1


def suffix_array(T: np.ndarray) -> np.ndarray:
    """Suffix array of T by prefix doubling; returns SA (int32, N): SA[r] = start of the r-th smallest suffix.

    rank[i] is the SA row where suffix i's group starts (its "head"): suffixes tied on their first k tokens share
    it. Each round sorts only the still-tied suffixes by (rank[i], rank[i + k]), in place inside their groups'
    rows (Larsson & Sadakane's refinement of Manber & Myers), so late rounds over long repeats cost little.
    """
    T = np.asarray(T)
    N = len(T)
    if N == 0:
        return np.empty(0, np.int32)
    SA = np.argsort(T, kind="stable").astype(np.int64)  # (N,) ordered by the first token
    Ts = T[SA]  # (N,)
    first = np.concatenate(([True], Ts[1:] != Ts[:-1]))  # (N,) row starts a new group
    rank = np.empty(N, np.int64)
    rank[SA] = np.maximum.accumulate(np.where(first, np.arange(N), 0))  # (N,) head row of each suffix's group
    U = np.flatnonzero(_tied(first))  # (u,) SA rows still tied, whole groups, ascending
    k = 1
    while U.size:
        idx = SA[U]  # (u,) tied suffixes
        nxt = idx + k
        second = np.where(nxt < N, rank[np.minimum(nxt, N - 1)] + 1, 0)  # (u,) 0 = past the end, below any rank
        key = rank[idx] * (N + 1) + second  # (u,) (head, rank k later) packed; < N^2 + 2N, fits int64 to N ~ 3e9
        order = np.argsort(key)  # ties stay tied: later rounds order them
        idx, key = idx[order], key[order]
        SA[U] = idx  # the primary key is the head, so each suffix stays inside its group's rows
        first = np.concatenate(([True], key[1:] != key[:-1]))  # (u,)
        rank[idx] = U[np.maximum.accumulate(np.where(first, np.arange(len(U)), 0))]  # new heads
        U = U[_tied(first)]
        k *= 2
    return SA.astype(np.int32)


def find(T: np.ndarray, SA: np.ndarray, pattern: Sequence[int]) -> tuple[int, int]:
    """[lo, hi): the SA rows whose suffix starts with `pattern` (binary search, O(|pattern| log N))."""
    P = [int(t) for t in pattern]
    m = len(P)
    lo, hi = 0, len(SA)
    while lo < hi:  # lower bound: first suffix whose m-prefix is >= P
        mid = (lo + hi) // 2
        s = int(SA[mid])
        if T[s: s + m].tolist() < P:  # a suffix shorter than m that is a prefix of P sorts first, as in SA
            lo = mid + 1
        else:
            hi = mid
    start = lo
    if start == len(SA) or T[int(SA[start]): int(SA[start]) + m].tolist() != P:
        return start, start  # no occurrence: skip the second search (most lookups of long suffixes end here)
    hi = len(SA)
    while lo < hi:  # upper bound: first suffix whose m-prefix is > P
        mid = (lo + hi) // 2
        s = int(SA[mid])
        if T[s: s + m].tolist() <= P:
            lo = mid + 1
        else:
            hi = mid
    return start, lo


# -------------------------------------------------------------------------------------------------- retrieval


@dataclass
class Retrieval:
    """What one lookup found: the matched suffix length n, how many occurrences the corpus has, and the
    continuations examined (at most max_occurrences), one row each, padded with SEP where a document ends."""

    n: int  # length of the context suffix that matched (0: nothing matched)
    occurrences: int  # occurrences of that suffix in the corpus
    continuations: np.ndarray  # (k, gamma) int32, SEP-padded

    def chain(self) -> list[int]:
        """The most frequent path of the trie of continuations: at each depth the child with the most
        continuations through it (ties: the smallest token id), following only continuations on the path."""
        C = self.continuations  # (k, gamma)
        alive = np.ones(len(C), bool)  # (k,) continuations that agree with the path so far
        path: list[int] = []
        for j in range(C.shape[1]):
            col = C[alive, j]  # (k_alive,)
            col = col[col != SEP]
            if col.size == 0:
                break
            values, counts = np.unique(col, return_counts=True)
            x = int(values[int(np.argmax(counts))])
            path.append(x)
            alive &= C[:, j] == x
        return path

    def tree(self, max_nodes: int, depth: int, stop_ids: frozenset[int] = frozenset()) -> tuple[list[int], list[int]]:
        """REST's draft tree: the `max_nodes` most frequent nodes of the trie of continuations cut to `depth`
        (ties: shallower first, then smaller token id), as (tokens, parents) with parents before children
        (-1 = the context's last token). A node's count never exceeds its parent's, so the set is prefix-closed;
        nothing is grown below a stop token."""
        count: dict[tuple[int, ...], int] = {}
        for row in self.continuations[:, :depth].tolist():
            for j, t in enumerate(row):
                if t == SEP:
                    break
                key = tuple(row[:j + 1])
                count[key] = count.get(key, 0) + 1
                if t in stop_ids:
                    break
        keep = sorted(count, key=lambda k: (-count[k], len(k), k))[:max_nodes]
        keep.sort(key=lambda k: (len(k), k))  # parents first
        index = {k: i for i, k in enumerate(keep)}
        return [k[-1] for k in keep], [index.get(k[:-1], -1) for k in keep]


_IDENTITIES: dict[int, tuple[weakref.ref, int, dict]] = {}


def tokenizer_identity(tokenizer) -> dict:
    """Vocab size and sha256 of the (token, id) pairs sorted by id: equal exactly when ids mean the same tokens.

    Hashing Qwen's 151,936 entries takes ~0.8 s here, so the result is remembered per live tokenizer object (and
    recomputed if tokens were added since)."""
    key = id(tokenizer)
    hit = _IDENTITIES.get(key)
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else -1
    if hit is not None and hit[0]() is tokenizer and hit[1] == size:
        return dict(hit[2])
    vocab = tokenizer.get_vocab()  # token -> id, added tokens included
    pairs = sorted(vocab.items(), key=lambda kv: (kv[1], kv[0]))
    digest = hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode("utf-8")).hexdigest()
    ident = {"vocab_size": len(vocab), "vocab_sha256": digest,
             "name": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)}
    try:
        _IDENTITIES[key] = (weakref.ref(tokenizer), size, ident)
    except TypeError:  # not weak-referenceable: just do not remember it
        pass
    return dict(ident)


class Datastore:
    """T (int32, N) and its suffix array SA (int32, N), plus a header describing how they were built."""

    def __init__(self, T: np.ndarray, SA: np.ndarray, header: dict):
        self.T = T  # (N,)
        self.SA = SA  # (N,)
        self.header = header

    def __len__(self) -> int:
        return len(self.T)

    # ---- building

    @classmethod
    def from_docs(cls, docs: Iterable[Sequence[int]], tokenizer=None, *, vocab_size: int | None = None,
                  sources: dict | None = None) -> Datastore:
        """Concatenate token-id documents (each followed by SEP) and index them. The tokenizer (or, for raw ids,
        vocab_size) is recorded so that the datastore can refuse a model with another vocabulary."""
        t0 = time.perf_counter()
        parts: list[np.ndarray] = []
        n_docs = 0
        sep = np.array([SEP], np.int32)
        for d in docs:
            a = np.asarray(d, dtype=np.int64)
            if a.size and a.min() < 0:
                raise ValueError("token ids must be >= 0")
            parts += [a.astype(np.int32), sep]
            n_docs += 1
        T = np.concatenate(parts) if parts else np.empty(0, np.int32)  # (N,)
        if n_docs == 0 or len(T) == n_docs:
            raise ValueError("the corpus has no tokens: nothing to retrieve from")
        if tokenizer is not None:
            ident = tokenizer_identity(tokenizer)
        elif vocab_size is not None:
            ident = {"vocab_size": int(vocab_size), "vocab_sha256": None, "name": "raw token ids"}
        else:
            raise ValueError("give the tokenizer (or, for raw token ids, vocab_size) the datastore is built for")
        max_id = int(T.max())
        if vocab_size is not None and max_id >= vocab_size:
            raise ValueError(f"token id {max_id} is outside the vocabulary of {vocab_size}")
        t1 = time.perf_counter()
        SA = suffix_array(T)
        header = {"format": FORMAT, "version": VERSION, "tokenizer": ident, "separator": SEP,
                  "n_tokens": int(len(T) - n_docs), "n_docs": n_docs, "max_token_id": max_id,
                  "sources": sources or {}, "suffix_array": "prefix doubling (numpy, Larsson-Sadakane)",
                  "seconds_concat": round(t1 - t0, 3), "seconds_suffix_array": round(time.perf_counter() - t1, 3)}
        return cls(T, SA, header)

    # ---- persistence

    def save(self, path: str | Path) -> Path:
        """Write one .npz atomically: a temporary file in the same folder, renamed when complete."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:  # a file object: np.savez must not append its own ".npz"
                np.savez(f, tokens=self.T, sa=self.SA, header=np.array(json.dumps(self.header)))
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Datastore:
        path = Path(path)
        if not path.is_file():
            raise DatastoreError(f"no REST datastore at {path}; build one with `verispec datastore build`")
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(str(z["header"]))
                T, SA = z["tokens"], z["sa"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
            raise DatastoreError(f"{path} is not a readable verispec REST datastore: {e}") from e
        if header.get("format") != FORMAT or header.get("version") != VERSION:
            raise DatastoreError(f"{path} is not a verispec REST datastore of version {VERSION} "
                                 f"(format {header.get('format')!r}, version {header.get('version')!r})")
        if T.dtype != np.int32 or SA.dtype != np.int32 or T.shape != SA.shape or T.ndim != 1:
            raise DatastoreError(f"{path} is corrupted: tokens {T.dtype}{T.shape}, suffix array {SA.dtype}{SA.shape}")
        return cls(T, SA, header)

    def check_compatible(self, tokenizer=None, vocab_size: int | None = None) -> None:
        """Refuse a model whose token ids mean other tokens than the datastore's."""
        ident = self.header["tokenizer"]
        if ident.get("vocab_sha256") is not None:
            if tokenizer is None:
                raise DatastoreMismatchError(
                    f"the datastore was built with tokenizer {ident['name']!r}, but the model has no tokenizer to "
                    f"check it against; load the model with its tokenizer")
            mine = tokenizer_identity(tokenizer)
            if (mine["vocab_size"], mine["vocab_sha256"]) != (ident["vocab_size"], ident["vocab_sha256"]):
                raise DatastoreMismatchError(
                    f"the datastore was built with tokenizer {ident['name']!r} ({ident['vocab_size']} tokens, vocab "
                    f"sha256 {ident['vocab_sha256'][:12]}), but the model's tokenizer {mine['name']!r} has "
                    f"{mine['vocab_size']} tokens (sha256 {mine['vocab_sha256'][:12]}): its token ids mean other "
                    f"tokens. Build a datastore for this model with `verispec datastore build --target ...`.")
        if vocab_size is not None and self.header["max_token_id"] >= vocab_size:
            raise DatastoreMismatchError(f"the datastore holds token id {self.header['max_token_id']}, outside the "
                                         f"model's vocabulary of {vocab_size}")

    # ---- retrieval

    def find(self, pattern: Sequence[int]) -> tuple[int, int]:
        return find(self.T, self.SA, pattern)

    def retrieve(self, context: Sequence[int], gamma: int, *, max_suffix: int = 16, min_suffix: int = 2,
                 max_occurrences: int = 256) -> Retrieval:
        """Continuations of the longest context suffix (length n_max down to n_min) that occurs in the corpus."""
        empty = Retrieval(0, 0, np.empty((0, max(gamma, 0)), np.int32))
        if gamma <= 0:
            return empty
        for n in range(min(max_suffix, len(context)), max(min_suffix, 1) - 1, -1):
            lo, hi = self.find(context[len(context) - n:])
            if hi > lo:
                break
        else:
            return empty
        occ = hi - lo
        if occ <= max_occurrences:
            rows = np.arange(lo, hi)  # (k,)
        else:  # SA rows are sorted by continuation: evenly spaced rows keep the counts representative
            rows = np.unique(np.linspace(lo, hi - 1, max_occurrences).round().astype(np.int64))  # (k,)
        N = len(self.T)
        pos = self.SA[rows].astype(np.int64)[:, None] + n + np.arange(gamma)  # (k, gamma) positions after match
        C = np.where(pos < N, self.T[np.minimum(pos, N - 1)], SEP).astype(np.int32)  # (k, gamma)
        C[np.cumsum(C == SEP, axis=1) > 0] = SEP  # nothing after a document's end
        return Retrieval(n, occ, C)

    def info(self) -> dict:
        return {**self.header, "bytes_in_memory": int(self.T.nbytes + self.SA.nbytes)}


# ------------------------------------------------------------------------------------------- corpus -> datastore


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(corpus: str | Path, max_files: int | None = None) -> list[Path]:
    """`stdlib` (the *.py files of Python's standard library, without site-packages and without the files the
    benchmark's nl, summarize and code-edit prompts are cut from: a datastore or training set must not hold the
    benchmark's own text), a directory (every file under it, recursively), a file, or a glob pattern (`**`
    allowed). Sorted, so builds are reproducible."""
    corpus = str(corpus)
    if corpus == "stdlib":
        from verispec.bench.datasets import bench_sources

        root, held = stdlib_dir(), bench_sources()
        files = [p for p in root.rglob("*.py")
                 if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)
                 and p.resolve() not in held]
    elif Path(corpus).is_dir():
        files = [p for p in Path(corpus).rglob("*") if p.is_file()]
    elif Path(corpus).is_file():
        files = [Path(corpus)]
    else:
        files = [Path(p) for p in glob.glob(corpus, recursive=True) if Path(p).is_file()]
    files = sorted(files)
    if not files:
        raise ValueError(f"corpus {corpus!r} has no files (give `stdlib`, a directory, a file or a glob)")
    return files[:max_files] if max_files is not None else files


def _read_text(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None  # binary file
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # a few stdlib test files use other encodings; keep their ASCII code


def build_datastore(tokenizer, corpus: str | Path, *, max_files: int | None = None, max_tokens: int | None = None,
                    batch: int = 64, progress: Callable[[str], None] | None = None,
                    target: str | None = None) -> Datastore:
    """Tokenize the corpus files with the model's tokenizer (no special tokens) and index them."""
    t0 = time.perf_counter()
    files = corpus_files(corpus, max_files)
    docs: list[list[int]] = []
    total = skipped = 0
    for b in range(0, len(files), batch):
        chunk = files[b: b + batch]
        texts = [_read_text(p) for p in chunk]
        skipped += sum(t is None or not t.strip() for t in texts)
        texts = [t for t in texts if t and t.strip()]
        if not texts:
            continue
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            if max_tokens is not None and total + len(ids) > max_tokens:
                ids = ids[: max_tokens - total]
            docs.append(ids)
            total += len(ids)
            if max_tokens is not None and total >= max_tokens:
                break
        if progress:
            progress(f"tokenized {min(b + batch, len(files))}/{len(files)} files, {total:,} tokens")
        if max_tokens is not None and total >= max_tokens:
            break
    t1 = time.perf_counter()
    if progress:
        progress(f"building the suffix array of {total:,} tokens")
    sources = {"target": target, "corpus": str(corpus) if str(corpus) != "stdlib" else f"stdlib ({stdlib_dir()})",
               "files": len(docs), "skipped_files": skipped, "max_files": max_files, "max_tokens": max_tokens,
               "seconds_tokenize": round(t1 - t0, 3)}
    return Datastore.from_docs(docs, tokenizer, sources=sources)


def build_datastore_file(tokenizer, corpus: str | Path, out: str | Path, **kw) -> Datastore:
    """build_datastore + save; the file appears only when complete."""
    ds = build_datastore(tokenizer, corpus, **kw)
    ds.save(out)
    return ds


def log(msg: str) -> None:
    """Progress messages on stderr, in the style of the model store."""
    print(f"[verispec] {msg}", file=sys.stderr, flush=True)
