"""CPU execution backends: how a loaded model's linear layers are computed.

- "torch": the model as transformers built it (torch defaults: MKL `F.linear`). Nothing is changed.
- "fast":  every fp32 `nn.Linear` (attention and MLP projections and the output layer / lm_head) is replaced in
           place by `FastLinear`, which multiplies with a oneDNN pre-packed fp32 weight and drops the dense one.
           Numerically fp32 (same sums in another order); greedy output is expected to stay token-identical.
- "auto":  "fast" on a CPU model when oneDNN is available, else "torch".
- "fast-bf16" (lossy, for drafters): as "fast" with bf16 packed weights — half the bytes to read — and each
           linear's input rounded to bf16; oneDNN accumulates in fp32 and the rest of the model stays fp32.
           Fast only where the CPU has native bf16 (AVX512-BF16 / AMX); emulated, it is slower than fp32.
- "fast-int8" (lossy, for drafters): dynamically quantized linears, int8 weights per channel and int8
           activations per call (`verispec.backends.int8`); falls back to "fast" where int8 is unavailable.
- "auto-draft": what a drafter that verispec loads by name gets when the target runs on "auto": the cheapest
           lossy backend here — "fast-int4" on a CPU with native bf16 or AVX-512 VNNI (the instructions its kernels
           need to be fast), else "fast-int8", else "fast"; "torch" off CPU. A drafter changes only speed, never the
           output.
- "fast-int4" (lossy, for drafters): 4-bit group-quantized weights (`verispec.backends.int4`), half the bytes of
           int8 — the cheapest 1-row forward here. On an AVX-512 VNNI CPU our own kernel runs them with int8
           activations (`verispec.backends.q4kernel`, built on first use); elsewhere PyTorch's int4 kernel with bf16
           activations. Layers the kernels cannot take stay "fast"; falls back to "fast-int8" where PyTorch's int4
           kernel is missing.
           A target put on a lossy backend *is* the reduced model: losslessness then holds relative to it.
           The lossy backends also fuse q/k/v and gate/up into one linear each in Qwen2 / Llama models
           (`verispec.backends.fuse`); drafters of those families run `verispec.backends.lean`'s forward.

Why: on this CPU a torch-default k-row linear costs ~2x a 1-row one already at k = 2, so verifying γ drafts is far
from free; a packed oneDNN weight was measured (FACTS.md, "Kernels") close to flat for 1–16 rows. See
`verispec.backends.onednn` for the kernel and its fallback, `verispec.backends.measure` for the T(k) curve.

Tied embeddings: when the output layer shares its weight with the input embedding, the embedding keeps its dense
weight (the lookup needs it) and the output layer gets its own packed copy; that costs one extra vocab × hidden
fp32 matrix (Qwen2.5-0.5B-sized: 151,936 × 896 × 4 B ≈ 0.5 GiB) and the two no longer share storage (they are
not trained here). `pack_tied=False` leaves a tied output layer as a plain nn.Linear instead. Both Qwen models
used by verispec have untied output layers.

Apply a backend last, after loading (and after anything that re-ties weights); it is meant for inference.
"""

from __future__ import annotations

import bisect
import functools
import warnings

import torch
from torch import nn

from verispec.backends.fuse import fuse_projections
from verispec.backends.int4 import Int4Linear, int4_available
from verispec.backends.int8 import int8_available, is_int8_linear, quantize_int8
from verispec.backends.q4kernel import _cpu_flags as cpu_flags, q4_kernel
from verispec.backends.onednn import FORCE_FALLBACK_ENV, FastLinear, fallback_forced, onednn_available

BACKENDS = ("torch", "fast", "auto", "auto-draft", "fast-bf16", "fast-int8", "fast-int4")
LOSSY_BACKENDS = ("fast-bf16", "fast-int8", "fast-int4")  # for drafters; a target on one *is* the reduced model

__all__ = ["BACKENDS", "LOSSY_BACKENDS", "FORCE_FALLBACK_ENV", "FastLinear", "apply_backend", "backend_of",
           "drafter_backend", "fallback_forced", "native_bf16",
           "onednn_available", "release_file_mappings", "resolve_backend", "weight_count"]


def resolve_backend(name: str | None, model: nn.Module | None = None) -> str:
    """'auto' (or None) -> 'fast' for a CPU model when oneDNN is available, else 'torch'; other names checked."""
    name = "auto" if name is None else str(name).strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    if name == "auto-draft":
        if resolve_backend("auto", model) == "torch":
            return "torch"
        int4_fast = int4_available() and (native_bf16() or q4_kernel() is not None)  # bf16 for PyTorch's kernel
        return "fast-int4" if int4_fast else "fast-int8" if int8_available() else "fast"
    if name != "auto":
        return name
    on_cpu = model is None or all(p.device.type == "cpu" for p in model.parameters())
    return "fast" if on_cpu and onednn_available() and not fallback_forced() else "torch"


def drafter_backend(backend: str | None, drafter_backend: str | None = None) -> str:
    """The backend for a drafter verispec loads by name: `drafter_backend` when given; 'auto-draft' (the cheapest
    lossy one) when the target's is 'auto'; else the target's own (an explicit choice is followed)."""
    if drafter_backend:
        return drafter_backend
    return "auto-draft" if backend in (None, "auto") else backend


@functools.lru_cache(maxsize=1)
def native_bf16() -> bool:
    """Whether the CPU has bf16 instructions (AVX512-BF16 or AMX), from /proc/cpuinfo; False where unknown."""
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _unwrap(model) -> nn.Module:
    inner = getattr(model, "model", None)  # a verispec LoadedModel holds the nn.Module in .model
    return model if isinstance(model, nn.Module) else inner


def apply_backend(model, name: str | None = "fast", *, force_fallback: bool = False, verify: bool = True,
                  pack_tied: bool = True, release_mapped: bool = True, fuse: bool = True):
    """Put `model` (an nn.Module or a verispec LoadedModel) on backend `name`, in place; return `model`.

    "fast" swaps every `nn.Linear` with an fp32 weight for a `FastLinear` (packed weight, dense one dropped);
    linears of other dtypes are left alone ("fast-bf16" / "fast-int8": the lossy drafter variants, see the module
    docstring). force_fallback=True builds the same modules on the pure-torch path (dense weight, F.linear) —
    also forced by the environment variable VERISPEC_FORCE_TORCH_LINEAR=1. verify=True checks each packed layer
    against F.linear on two probe rows and keeps the dense weight where they disagree. release_mapped=True then
    copies the tensors still living in a memory-mapped weight file (safetensors) into private memory so the
    mapping, and the dense weights' file pages with it, leave the process (`release_file_mappings`).
    fuse=True (lossy backends only) first fuses q/k/v and gate/up of Qwen2 / Llama blocks into one linear each
    (`verispec.backends.fuse`); fuse=False keeps them separate (to measure what fusing buys).
    Layers already converted are left as they are (applying twice is a no-op); "torch" never changes anything
    (it does not undo "fast": reload the model for that).
    """
    module = _unwrap(model)
    if not isinstance(module, nn.Module):
        raise TypeError(f"apply_backend needs an nn.Module or a LoadedModel, got {type(model).__name__}")
    name = resolve_backend(name, module)
    if name == "torch":
        return model
    if name == "fast-int4" and (force_fallback or fallback_forced() or not int4_available()):
        warnings.warn("verispec: the int4 kernel is unavailable or fallback forced; using the 'fast-int8' backend",
                      RuntimeWarning, stacklevel=2)
        name = "fast-int8"
    if name == "fast-int8" and (force_fallback or fallback_forced() or not int8_available()):
        warnings.warn("verispec: int8 linears unavailable or fallback forced; using the fp32 'fast' backend",
                      RuntimeWarning, stacklevel=2)
        name = "fast"
    if fuse and name in LOSSY_BACKENDS:
        fuse_projections(module)  # q/k/v and gate/up as one linear each: fewer, wider kernel calls (backends.fuse)
    tied = _tied_output_weight(module)
    # Collect first, then swap: replacing children while iterating named_modules() would skip or revisit some.
    # Exact type only: nn.Linear subclasses (e.g. inside nn.MultiheadAttention) may read .weight themselves.
    targets = [(f"{parent_name}.{child_name}" if parent_name else child_name, parent, child_name, child)
               for parent_name, parent in module.named_modules()
               for child_name, child in parent.named_children()
               if type(child) is nn.Linear and child.weight.dtype == torch.float32
               and (pack_tied or tied is None or child.weight is not tied)]
    if name == "fast-int8":
        with torch.no_grad():
            for *_, child in targets:
                if child.bias is not None:  # the int8 packed params keep the bias tensor itself: give them a
                    child.bias.data = child.bias.data.clone()  # private copy, not one pinning a mapped file
        quantize_int8(module, [full for full, *_ in targets])
    elif name == "fast-int4":
        for _, parent, child_name, child in targets:  # a layer the kernel cannot take stays fp32 "fast"
            setattr(parent, child_name, Int4Linear.from_linear(child, verify=verify)
                    or FastLinear.from_linear(child, verify=verify))
    else:
        dtype = torch.bfloat16 if name == "fast-bf16" else torch.float32
        for _, parent, child_name, child in targets:
            setattr(parent, child_name,
                    FastLinear.from_linear(child, force_fallback=force_fallback, verify=verify, dtype=dtype))
    if release_mapped:
        release_file_mappings(module)
    setattr(module, "verispec_backend", name)
    return model


def _file_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process's file-backed mappings (Linux /proc/self/maps; [] elsewhere)."""
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[4] != "0" and not parts[5].startswith("["):  # inode != 0: a file
                    lo, hi = parts[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return sorted(ranges)


def release_file_mappings(module: nn.Module) -> int:
    """Copy every tensor of `module` that lives in a file mapping into private memory; return bytes copied.

    transformers loads safetensors by memory-mapping the file, and the mapping is one per file: it stays resident
    while *any* tensor still points into it (the embedding, norms, biases), so after packing the RSS would count the
    dense linear weights twice — once packed, once as (clean, reclaimable) file pages. Copying the few remaining
    tensors lets the mapping close. Sharing is kept: tensors viewing the same storage get one copy.
    """
    ranges = _file_ranges()
    if not ranges:
        return 0
    starts = [lo for lo, _ in ranges]

    def mapped(t: torch.Tensor) -> bool:
        if t is None or t.is_mkldnn or t.device.type != "cpu" or t.numel() == 0:
            return False
        ptr = t.untyped_storage().data_ptr()
        i = bisect.bisect_right(starts, ptr) - 1
        return i >= 0 and ptr < ranges[i][1]

    copies: dict[tuple, torch.Tensor] = {}
    copied = 0

    def private(t: torch.Tensor) -> torch.Tensor:
        nonlocal copied
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key not in copies:
            copies[key] = t.detach().clone()
            copied += t.numel() * t.element_size()
        return copies[key]

    with torch.no_grad():
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                if mapped(p):
                    p.data = private(p)  # the Parameter object stays: ties by identity are kept
            for name, b in m.named_buffers(recurse=False):
                if mapped(b):
                    m._buffers[name] = private(b)
            if isinstance(m, FastLinear) and m.dense is not None and mapped(m.dense):
                m.dense = private(m.dense)
    return copied


def _tied_output_weight(module: nn.Module) -> torch.Tensor | None:
    """The output layer's weight when it is the very tensor of the input embedding, else None."""
    try:
        out, inp = module.get_output_embeddings(), module.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if out is None or inp is None or not hasattr(out, "weight") or not hasattr(inp, "weight"):
        return None
    w_out, w_in = out.weight, inp.weight
    if not isinstance(w_out, torch.Tensor) or w_out.is_mkldnn or w_in.is_mkldnn:
        return None
    return w_out if w_out is w_in or w_out.data_ptr() == w_in.data_ptr() else None


def backend_of(model) -> str:
    """The backend `model`'s linear layers are on: 'fast-int4', 'fast-int8', 'fast-bf16', 'fast' or 'torch'."""
    module = _unwrap(model)
    mods = list(module.modules())
    if any(isinstance(m, Int4Linear) for m in mods):
        return "fast-int4"
    if any(is_int8_linear(m) for m in mods):
        return "fast-int8"
    fast = [m for m in mods if isinstance(m, FastLinear)]
    if any(m.dtype == torch.bfloat16 for m in fast):
        return "fast-bf16"
    return "fast" if fast else "torch"


def weight_count(model) -> int:
    """Parameters plus the weights of FastLinear / int8 / int4 layers (held as packed tensors, not Parameters)."""
    module = _unwrap(model)
    n = sum(p.numel() for p in module.parameters())
    copies = {id(m.wide) for m in module.modules() if isinstance(m, Int4Linear) and m.wide is not None}
    return n + sum(m.in_features * m.out_features for m in module.modules()
                   if (isinstance(m, (FastLinear, Int4Linear)) or is_int8_linear(m)) and id(m) not in copies)
