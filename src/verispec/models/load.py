"""Load a target or drafter: a registry name (pulled on first use), a local HF folder, or a built model object."""

from __future__ import annotations

import copy
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from verispec.backends import apply_backend, backend_of, kernel_path, resolve_backend, weight_count
from verispec.models.errors import ModelNotFoundError, TokenizerMismatchError
from verispec.models.registry import REGISTRY
from verispec.models.store import check_converted, hf_dir, pull


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object | None = None
    name: str = "model"
    stop_ids: frozenset[int] = field(default_factory=frozenset)

    @property
    def backend(self) -> str:
        """How its linear layers run (see verispec.backends), read off the layers; named in every report."""
        return backend_of(self.model)

    @property
    def kernel(self) -> str:
        """What computes its linear layers, in words (the kernel path named in reports)."""
        return kernel_path(self.model)

    @property
    def vocab_size(self) -> int:
        """Width of the model's output distribution (rows of the output layer)."""
        from verispec.cache import output_width

        return output_width(self.model)

    @property
    def num_parameters(self) -> int:
        """Weights of the model, counting packed / int8 linear layers (which are not nn.Parameters)."""
        return weight_count(self.model)


def _ids(x) -> set[int]:
    if x is None:
        return set()
    if isinstance(x, int):
        return {x}
    return {int(i) for i in x}


def stop_ids_of(model: torch.nn.Module, tokenizer=None, extra=()) -> frozenset[int]:
    ids = set(extra) | _ids(getattr(model.config, "eos_token_id", None))
    gc = getattr(model, "generation_config", None)
    if gc is not None:
        ids |= _ids(gc.eos_token_id)
    if tokenizer is not None:
        ids |= _ids(getattr(tokenizer, "eos_token_id", None))
    return frozenset(ids)


AUTOMATIC = (None, "auto", "auto-draft")  # backends never applied to a model object passed in


def load_model(source, tokenizer=None, *, dtype=torch.float32, auto_pull: bool = True,
               backend: str | None = "auto", in_place: bool = False) -> LoadedModel:
    """source: LoadedModel | nn.Module | registry name | local folder with an HF causal LM.

    backend: how the linear layers run ("auto" = the fast packed fp32 path on CPU, "torch" = as transformers
    built it, "fast-bf16"/"fast-int8"/"fast-int4" = reduced-precision weights for drafters, "auto-draft" = the
    cheapest of those here; see verispec.backends). It is applied to models verispec loads itself. A model object
    you pass in is never changed behind your back: the automatic backends ("auto", "auto-draft") leave it as it is,
    and another backend is applied to a *copy* of it (so the same object can serve as target and, on another
    backend, as drafter), unless in_place=True asks to convert the object itself.
    """
    if isinstance(source, torch.nn.Module):
        source.eval()
        source = LoadedModel(source, tokenizer, type(source).__name__, stop_ids_of(source, tokenizer))
    if isinstance(source, LoadedModel):
        if backend in AUTOMATIC or resolve_backend(backend, source.model) == source.backend:
            return source
        if not in_place:
            print(f"[verispec] converting a copy of the {source.name} model object to backend {backend!r} (the "
                  f"object passed in stays as it is; load_model(..., in_place=True) converts it instead)",
                  file=sys.stderr, flush=True)
            source = dataclasses.replace(source, model=copy.deepcopy(source.model))
        return _apply(source, backend)
    if not isinstance(source, (str, Path)):
        raise TypeError(f"cannot load a model from {type(source).__name__}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(source)
    extra: tuple[int, ...] = ()
    if name in REGISTRY:
        if auto_pull:
            path = pull(name)
        else:
            check_converted(name)
            path = hf_dir(name)
        extra = REGISTRY[name].stop_ids
    elif Path(name).is_dir():
        path = Path(name)
    else:
        raise ModelNotFoundError(
            f"unknown model {name!r}: not a registry name ({', '.join(REGISTRY)}) and not a local folder")
    resolve_backend(backend)  # an unknown name is refused before minutes of loading
    if name in REGISTRY and native_for_file(backend):
        from verispec.models.store import model_dir

        spec = REGISTRY[name]
        g = model_dir(name) / spec.gguf_name
        if auto_pull or (g.is_file() and g.stat().st_size == spec.size):
            try:
                return _load_native(name, path, tokenizer, extra)
            except ValueError as e:  # a block type or architecture the native kernels do not cover
                if backend == "gguf":
                    raise
                print(f"[verispec] {name}: the gguf backend cannot run this file ({e}); loading it on 'fast'",
                      file=sys.stderr, flush=True)
        if backend == "gguf":
            raise ModelNotFoundError(f"{name}: the gguf backend reads its GGUF file, which is not cached ({g}); "
                                     f"load with auto_pull=True or run `verispec models pull {name}`")
        # "auto" without the file and without pulling: the converted fp32 folder on the fp32 backend
    print(f"[verispec] loading {name}", file=sys.stderr, flush=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"could not load a causal LM from {path}: {e}") from e
    model.eval()
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError):
            tokenizer = None
    out = LoadedModel(model, tokenizer, Path(name).name if name not in REGISTRY else name,
                      stop_ids_of(model, tokenizer, extra))
    return _apply(out, backend)


def native_for_file(backend: str | None) -> bool:
    """Whether a registry model loaded by name goes on the gguf backend: asked for, or "auto" where the native C++
    kernels build and run here (the torch path alone is too slow to be a default)."""
    if backend == "gguf":
        return True
    if backend not in (None, "auto") or resolve_backend(backend) == "torch":
        return False
    from verispec.kernels.native import native_path

    return native_path() != "torch"


def _load_native(name: str, path: Path, tokenizer, extra) -> LoadedModel:
    from transformers import AutoTokenizer

    from verispec.models.gguf_native import from_gguf
    from verispec.models.store import gguf_file

    model = from_gguf(gguf_file(name), path)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return LoadedModel(model, tokenizer, name, stop_ids_of(model, tokenizer, extra))


def _apply(m: LoadedModel, backend: str | None) -> LoadedModel:
    apply_backend(m.model, backend)
    return m


# (id(target tokenizer), id(drafter tokenizer)) -> (both tokenizers, their sizes) of pairs found to share a vocabulary:
# comparing two 151,936-entry vocabularies takes ~0.2 s, and `generate` checks its pair on every call. The tokenizers
# are kept (so an id is never reused for another object while it is here); a size change means check again.
_SAME_VOCAB: dict[tuple[int, int], tuple] = {}


def check_compatible(target: LoadedModel, drafter: LoadedModel) -> None:
    """Refuse a pair whose tokenizers map text to different ids: the drafter's proposals would be meaningless
    to the target and its probabilities could not be compared token by token."""
    tt, dt = target.tokenizer, drafter.tokenizer
    if tt is not None and dt is not None:
        key = (id(tt), id(dt))
        seen = _SAME_VOCAB.get(key)
        if seen is not None and seen[0] is tt and seen[1] is dt and seen[2] == (len(tt), len(dt)):
            return
        tv, dv = tt.get_vocab(), dt.get_vocab()
        if tv == dv:
            if len(_SAME_VOCAB) >= 8:
                _SAME_VOCAB.clear()
            _SAME_VOCAB[key] = (tt, dt, (len(tt), len(dt)))
        else:
            only_t = len(tv.keys() - dv.keys())
            only_d = len(dv.keys() - tv.keys())
            moved = sum(1 for k in tv.keys() & dv.keys() if tv[k] != dv[k])
            raise TokenizerMismatchError(
                f"tokenizers of target {target.name!r} ({len(tv)} entries) and drafter {drafter.name!r} "
                f"({len(dv)} entries) differ: {only_t} tokens only in the target, {only_d} only in the drafter, "
                f"{moved} with different ids. Speculative decoding needs a drafter with the same vocabulary; "
                f"method=\"uag\" (--method uag) drafts through text and pairs models with different tokenizers.")
        return
    if target.vocab_size != drafter.vocab_size:
        raise TokenizerMismatchError(
            f"target {target.name!r} has {target.vocab_size} output tokens and drafter {drafter.name!r} has "
            f"{drafter.vocab_size}; without tokenizers to compare, the vocabularies must have the same size.")
