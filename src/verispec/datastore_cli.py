"""`verispec datastore build|info`: build or inspect a REST datastore (He et al. 2024, "REST: Retrieval-Based
Speculative Decoding"). Only the target's tokenizer is loaded, never its weights. Heavy imports stay inside the
commands so `verispec --help` stays instant; `cli.py` wires this in with `register(sub)` (this module imports
nothing from the CLI)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

EXAMPLES = """examples:
  verispec datastore build --target qwen2.5-coder-1.5b --corpus stdlib --out runs/rest/stdlib.npz
  verispec datastore build --target ./my-hf-model --corpus 'docs/**/*.md' --out docs.npz --max-tokens 2000000
  verispec datastore info runs/rest/stdlib.npz
  python -c "import verispec; print(verispec.generate('qwen2.5-coder-1.5b', 'import os', method='rest',
      datastore='runs/rest/stdlib.npz').text)"
"""


def load_tokenizer(target: str):
    """The tokenizer of a registry model (pulled first if it is not cached) or of a local HF folder."""
    from transformers import AutoTokenizer

    from verispec.models import REGISTRY, is_cached, pull
    from verispec.models.errors import ModelNotFoundError
    from verispec.models.store import hf_dir

    if target in REGISTRY:
        folder = hf_dir(target) if is_cached(target) else pull(target)
    elif Path(target).is_dir():
        folder = Path(target)
    else:
        raise ModelNotFoundError(f"unknown model {target!r}: not a registry name ({', '.join(REGISTRY)}) and not "
                                 f"a local folder")
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"could not load a tokenizer from {folder}: {e}") from e


def cmd_build(a) -> int:
    from verispec.datastore import build_datastore_file, log

    for k in ("max_tokens", "max_files"):
        v = getattr(a, k)
        if v is not None and v < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {v}")
    t0 = time.perf_counter()
    tok = load_tokenizer(a.target)
    ds = build_datastore_file(tok, a.corpus, a.out, max_files=a.max_files, max_tokens=a.max_tokens,
                              progress=log if not a.quiet else None, target=a.target)
    h = ds.header
    size = Path(a.out).stat().st_size
    print(f"{a.out}: {h['n_tokens']:,} tokens from {h['n_docs']} files, {size / 2**20:.1f} MiB, "
          f"built in {time.perf_counter() - t0:.1f} s (tokenize {h['sources']['seconds_tokenize']:.1f} s, "
          f"suffix array {h['seconds_suffix_array']:.1f} s)")
    return 0


def cmd_info(a) -> int:
    from verispec.datastore import Datastore

    ds = Datastore.load(a.path)
    info = {**ds.info(), "file": str(a.path), "file_bytes": Path(a.path).stat().st_size}
    if a.json:
        print(json.dumps(info, indent=1))
        return 0
    t = info["tokenizer"]
    print(f"file:        {a.path} ({info['file_bytes'] / 2**20:.1f} MiB)")
    print(f"tokens:      {info['n_tokens']:,} in {info['n_docs']:,} documents (separator id {info['separator']})")
    print(f"tokenizer:   {t['name']} ({t['vocab_size']:,} entries, vocab sha256 {t['vocab_sha256']})")
    print(f"sources:     {json.dumps(info['sources'])}")
    print(f"index:       suffix array, {info['suffix_array']}, built in {info['seconds_suffix_array']} s")
    return 0


def register(subparsers) -> None:
    """Add `datastore build|info` to verispec's subcommands (argparse sub-parsers of cli.build_parser)."""
    d = subparsers.add_parser("datastore", help="build or inspect a REST retrieval datastore", epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    act = d.add_subparsers(dest="action", required=True)
    b = act.add_parser("build", help="tokenize a corpus with a model's tokenizer and index it (suffix array)",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--target", required=True, help="registry name or local HF folder whose tokenizer to use")
    b.add_argument("--corpus", default="stdlib",
                   help="`stdlib` (Python's standard library *.py files), a directory, a file or a glob "
                        "(default stdlib)")
    b.add_argument("--out", required=True, help="the .npz to write (written to a temporary file, then renamed)")
    b.add_argument("--max-tokens", type=int, help="stop after this many corpus tokens")
    b.add_argument("--max-files", type=int, help="use at most this many files (in sorted order)")
    b.add_argument("--quiet", action="store_true", help="no progress messages")
    b.set_defaults(func=cmd_build)
    i = act.add_parser("info", help="print a datastore's header")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)
