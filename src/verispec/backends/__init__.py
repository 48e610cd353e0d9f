"""CPU execution backends: how a loaded model's linear layers are computed. One registry of records.

Each `Backend` record says how a model is converted (`convert`, in place), how a converted model is recognised
(`detect`), whether it is lossy, whether it may serve a *target* (`target`, with the reason when not), what to fall
back to where its kernel is missing, and what kernel path it reports. Aliases ("auto", "auto-draft") resolve to a
concrete record for the machine at hand. The layer kernels live in `verispec.kernels`, model rewrites (fused
projections, the lean drafter forward) in `verispec.rewrites`, memory helpers in `verispec.backends.memory`, and the
T(k) measurement in `verispec.bench.measure`; this module only chooses and applies.

- "gguf":       the model's GGUF file's own blocks (Q4_K, Q6_K, Q8_0, Q5_0, Q4_1, Q4_0), multiplied with integer
                kernels, and every per-row operation (norms, SiLU, attention, rotary) computed per row in a fixed
                order: a position's logits are bit-identical whatever else shares the forward (batch-invariant by
                construction; `verispec.backends.native`). A registry model is built straight from its file
                (`verispec.models.gguf_native`, no fp32 copy); an in-process fp32 model is quantized to Q8_0
                first (it is then the quantized model). May serve a target. Kernel paths: AVX-512 VNNI, AVX2,
                generic C++, torch (`verispec.kernels.native`), all bit-identical.
- "torch":      the model as transformers built it (torch defaults: MKL `F.linear`). Nothing is changed.
- "fast":       every fp32 `nn.Linear` (attention and MLP projections and the output layer) becomes a `FastLinear`
                that multiplies with a oneDNN pre-packed fp32 weight; the dense weight is dropped. fp32 sums in
                another order. May serve a target.
- "auto":       for a registry model loaded by name: "gguf" where its C++ kernels build here (else "fast"); for other
                CPU models "fast" where oneDNN is available, else "torch".
- "fast-bf16", "fast-int8", "fast-int4": reduced-precision weights (bf16; int8 weights and per-call int8
                activations; 4-bit groups with an int8 copy for inputs of >= WIDE_ROWS rows). **Drafters only**: a
                drafter changes speed and acceptance, never the output. They are refused as targets, because the proof
                of losslessness needs the target's distribution at a position to depend on the prefix only, and theirs
                depends on what else is in the forward (int8: one activation scale per call over all rows; int4:
                which copy the row count selects; bf16: products rounded and summed in a row-count dependent
                order). On the 1.5B a logit moved by up to 0.13 (bf16), 4.3 (int8) and 4.9 (int4) between a 1-row
                and a 16-row forward, against 5e-5 on "fast" (`verispec invariance`). Use "auto", "fast" or
                "torch" for a target.
- "auto-draft": what a drafter that verispec loads by name gets when the target runs on "auto": the cheapest lossy
                backend here ("fast-int4" on a CPU with bf16 instructions or AVX-512 VNNI, else "fast-int8", else
                "fast"; "torch" off CPU).

Why: on this CPU a torch-default k-row linear costs ~2x a 1-row one already at k = 2, so verifying γ drafts is far
from free; a packed oneDNN weight is close to flat for 1-16 rows (`verispec.kernels.onednn`; `verispec.bench.measure`
measures the curve). How much "fast" departs from row independence is measured by `verispec invariance`.

Tied embeddings: when the output layer shares its weight with the input embedding, the embedding keeps its dense
weight (the lookup needs it) and the output layer gets its own packed copy (one extra vocab x hidden matrix);
`pack_tied=False` leaves a tied output layer as a plain nn.Linear instead.

Apply a backend last, after loading (and after anything that re-ties weights); it is meant for inference.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from verispec.backends.memory import release_file_mappings, tied_output_weight, unwrap, weight_count
from verispec.kernels.cpu import native_bf16
from verispec.kernels.int4 import WIDE_ROWS, Int4Linear, int4_available
from verispec.kernels.int8 import int8_available, is_int8_linear, quantize_int8
from verispec.kernels.onednn import FORCE_FALLBACK_ENV, FastLinear, fallback_forced, onednn_available
from verispec.kernels.q4kernel import q4_kernel
from verispec.rewrites.fuse import fuse_projections
from verispec.backends import native as _native

__all__ = ["BACKENDS", "Backend", "ConvertOptions", "FORCE_FALLBACK_ENV", "FastLinear", "apply_backend",
           "backend_of", "check_target", "drafter_backend", "fallback_forced", "kernel_path", "native_bf16",
           "onednn_available", "release_file_mappings", "resolve_backend", "weight_count"]


@dataclass(frozen=True)
class ConvertOptions:
    """How `apply_backend` converts (see its docstring)."""

    force_fallback: bool = False
    verify: bool = True
    pack_tied: bool = True
    fuse: bool = True


@dataclass(frozen=True)
class Backend:
    """One way to run a model's linear layers."""

    name: str
    summary: str
    lossy: bool = False
    target: bool = True  # may serve as a target (its logits at a position depend on the prefix only, up to fp32)
    not_target_because: str = ""
    convert: Callable[[nn.Module, ConvertOptions], None] | None = None  # in place; None = nothing to do
    detect: Callable[[nn.Module], bool] | None = None  # a converted module carries this backend's layers
    available: Callable[[ConvertOptions], bool] = lambda opts: True
    fallback: str | None = None  # used (with a warning) where `available` says no
    resolve: Callable[[nn.Module | None], str] | None = None  # aliases: the concrete backend for this machine
    kernel: Callable[[nn.Module], str] = lambda m: "transformers' own layers (torch F.linear)"


def _fp32_linears(module: nn.Module, opts: ConvertOptions) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    """(full name, parent, attribute, layer) of every plain fp32 nn.Linear, collected before any is replaced
    (replacing children while iterating named_modules() would skip or revisit some). Exact type only: nn.Linear
    subclasses (e.g. inside nn.MultiheadAttention) may read .weight themselves."""
    tied = None if opts.pack_tied else tied_output_weight(module)
    return [(f"{pname}.{cname}" if pname else cname, parent, cname, child)
            for pname, parent in module.named_modules() for cname, child in parent.named_children()
            if type(child) is nn.Linear and child.weight.dtype == torch.float32
            and (tied is None or child.weight is not tied)]


def _packed(dtype: torch.dtype, fused: bool) -> Callable[[nn.Module, ConvertOptions], None]:
    def convert(module: nn.Module, opts: ConvertOptions) -> None:
        if fused and opts.fuse:
            fuse_projections(module)  # q/k/v and gate/up as one linear each: fewer, wider kernel calls
        for _, parent, cname, child in _fp32_linears(module, opts):
            setattr(parent, cname, FastLinear.from_linear(child, force_fallback=opts.force_fallback,
                                                          verify=opts.verify, dtype=dtype))
    return convert


def _convert_int8(module: nn.Module, opts: ConvertOptions) -> None:
    if opts.fuse:
        fuse_projections(module)
    layers = _fp32_linears(module, opts)
    with torch.no_grad():
        for *_, child in layers:
            if child.bias is not None:  # the int8 packed params keep the bias tensor itself: give them a
                child.bias.data = child.bias.data.clone()  # private copy, not one pinning a mapped file
    quantize_int8(module, [full for full, *_ in layers])


def _convert_int4(module: nn.Module, opts: ConvertOptions) -> None:
    if opts.fuse:
        fuse_projections(module)
    for _, parent, cname, child in _fp32_linears(module, opts):  # a layer the kernels cannot take stays fp32 "fast"
        setattr(parent, cname, Int4Linear.from_linear(child, verify=opts.verify)
                or FastLinear.from_linear(child, verify=opts.verify))


def _fast_layers(module: nn.Module, dtype: torch.dtype) -> list[FastLinear]:
    return [m for m in module.modules() if isinstance(m, FastLinear) and m.dtype == dtype]


def _describe_fast(dtype: torch.dtype) -> Callable[[nn.Module], str]:
    def describe(module: nn.Module) -> str:
        layers = _fast_layers(module, dtype)
        fell = sum(not m.is_packed for m in layers)
        kind = "fp32" if dtype == torch.float32 else "bf16"
        return f"oneDNN packed {kind} ({len(layers) - fell} layers" + (f", {fell} on torch F.linear)" if fell else ")")
    return describe


def _describe_int4(module: nn.Module) -> str:
    layers = [m for m in module.modules() if isinstance(m, Int4Linear)]
    q4 = sum(m.kernel == "q4" for m in layers)
    fp32 = len(_fast_layers(module, torch.float32))
    parts = [f"{q4} on verispec's q4 AVX-512 VNNI kernel" if q4 else "",
             f"{len(layers) - q4} on PyTorch's int4 kernel" if len(layers) > q4 else "",
             f"{fp32} fp32 oneDNN" if fp32 else ""]
    engines = sorted({getattr(m.wide, "_vs_engine", "?") for m in layers if m.wide is not None})
    wide = (f" (inputs of >= {WIDE_ROWS} rows: an int8 copy on the {'/'.join(engines)} engine"
            f"{', AMX tiles' if 'onednn' in engines else ''})" if engines else "")
    return "int4 groups of 32: " + ", ".join(p for p in parts if p) + wide


def _resolve_auto(model: nn.Module | None) -> str:
    on_cpu = model is None or all(p.device.type == "cpu" for p in model.parameters())
    return "fast" if on_cpu and onednn_available() and not fallback_forced() else "torch"


def _resolve_auto_draft(model: nn.Module | None) -> str:
    if _resolve_auto(model) == "torch":
        return "torch"
    int4_fast = int4_available() and (native_bf16() or q4_kernel() is not None)  # bf16 for PyTorch's int4 kernel
    return "fast-int4" if int4_fast else "fast-int8" if int8_available() else "fast"


def _not_forced(opts: ConvertOptions) -> bool:
    return not (opts.force_fallback or fallback_forced())


_LOSSY_TARGET = ("its logits at a position depend on the other rows of the forward ({}), so a target on it would not "
                 "keep its own distribution; use 'auto', 'fast' or 'torch' for the target and this backend for the "
                 "drafter (--drafter-backend / drafter_backend=)")

def _convert_native(module: nn.Module, opts: ConvertOptions) -> None:
    _native.to_native(module)


# Detection order: the most specific layer types first (an int4 model also holds fp32 FastLinear layers).
BACKENDS: dict[str, Backend] = {b.name: b for b in [
    Backend("gguf", "the GGUF file's own blocks, integer kernels, batch-invariant by construction",
            convert=_convert_native, detect=_native.is_native, kernel=_native.describe),
    Backend("fast-int4", "4-bit group weights (drafters)", lossy=True, target=False,
            not_target_because=_LOSSY_TARGET.format(f"inputs of >= {WIDE_ROWS} rows take a separate int8 copy"),
            convert=_convert_int4, detect=lambda m: any(isinstance(x, Int4Linear) for x in m.modules()),
            available=lambda o: _not_forced(o) and int4_available(), fallback="fast-int8", kernel=_describe_int4),
    Backend("fast-int8", "int8 weights, per-call int8 activations (drafters)", lossy=True, target=False,
            not_target_because=_LOSSY_TARGET.format("one activation scale per call, over all its rows"),
            convert=_convert_int8, detect=lambda m: any(is_int8_linear(x) for x in m.modules()),
            available=lambda o: _not_forced(o) and int8_available(), fallback="fast",
            kernel=lambda m: "torch dynamic int8 (FBGEMM / x86 engine)"),
    Backend("fast-bf16", "oneDNN packed bf16 weights, bf16-rounded inputs (drafters)", lossy=True, target=False,
            not_target_because=_LOSSY_TARGET.format("bf16 products summed in a row-count dependent order"),
            convert=_packed(torch.bfloat16, fused=True), detect=lambda m: bool(_fast_layers(m, torch.bfloat16)),
            kernel=_describe_fast(torch.bfloat16)),
    Backend("fast", "oneDNN packed fp32 weights", convert=_packed(torch.float32, fused=False),
            detect=lambda m: bool(_fast_layers(m, torch.float32)), kernel=_describe_fast(torch.float32)),
    Backend("torch", "transformers' model as built", detect=lambda m: True),
    Backend("auto", "'fast' on a CPU with oneDNN, else 'torch'", resolve=_resolve_auto),
    Backend("auto-draft", "the cheapest lossy backend here (for drafters)", lossy=True, resolve=_resolve_auto_draft),
]}
LOSSY_BACKENDS = tuple(n for n, b in BACKENDS.items() if b.lossy and b.resolve is None)


def resolve_backend(name: str | None, model: nn.Module | None = None) -> str:
    """'auto' (or None) and 'auto-draft' -> the concrete backend for this machine (and `model`'s device); other
    names are checked and returned."""
    name = "auto" if name is None else str(name).strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    rec = BACKENDS[name]
    return rec.resolve(model) if rec.resolve is not None else name


def drafter_backend(backend: str | None, drafter_backend: str | None = None) -> str:
    """The backend for a drafter verispec loads by name: `drafter_backend` when given; 'auto-draft' (the cheapest
    lossy one) when the target's is 'auto'; else the target's own (an explicit choice is followed)."""
    if drafter_backend:
        return drafter_backend
    return "auto-draft" if backend in (None, "auto") else backend


def check_target(backend: str | None) -> None:
    """Refuse a backend that cannot serve a target (named or resolved), with the reason and the alternatives."""
    rec = BACKENDS[resolve_backend(backend)]
    if not rec.target:
        raise ValueError(f"backend {rec.name!r} cannot serve a target: {rec.not_target_because}")


def backend_of(model) -> str:
    """The backend `model`'s linear layers are on, recognised from the layers themselves."""
    module = unwrap(model)
    return next(name for name, b in BACKENDS.items() if b.detect is not None and b.detect(module))


def kernel_path(model) -> str:
    """What computes `model`'s linear layers, in words, for reports (e.g. "oneDNN packed fp32 (197 layers)")."""
    module = unwrap(model)
    return BACKENDS[backend_of(module)].kernel(module)


def apply_backend(model, name: str | None = "fast", *, force_fallback: bool = False, verify: bool = True,
                  pack_tied: bool = True, release_mapped: bool = True, fuse: bool = True):
    """Put `model` (an nn.Module or a verispec LoadedModel) on backend `name`, **in place**; return `model`.

    force_fallback=True builds the same layers on the pure-torch path (dense weight, F.linear) where a backend has
    one — also forced by the environment variable VERISPEC_FORCE_TORCH_LINEAR=1 — and sends the int8 / int4
    backends to their fallbacks. verify=True checks each packed layer against its formula on probe rows and keeps
    the layer exact where they disagree. release_mapped=True then copies the tensors still living in a
    memory-mapped weight file (safetensors) into private memory so the mapping leaves the process
    (`verispec.backends.memory.release_file_mappings`). fuse=True (lossy backends only) first fuses q/k/v and
    gate/up of Qwen2 / Llama blocks (`verispec.rewrites.fuse`); fuse=False keeps them separate.
    A model already on `name` is left as it is; one on another converted backend is refused (reload it): layers are
    converted from plain fp32 nn.Linear only, so a second conversion would silently do nothing.
    """
    module = unwrap(model)
    if not isinstance(module, nn.Module):
        raise TypeError(f"apply_backend needs an nn.Module or a LoadedModel, got {type(model).__name__}")
    opts = ConvertOptions(force_fallback, verify, pack_tied, fuse)
    rec = BACKENDS[resolve_backend(name, module)]
    while not rec.available(opts):
        warnings.warn(f"verispec: the {rec.name!r} kernels are unavailable or the fallback is forced; using the "
                      f"{rec.fallback!r} backend", RuntimeWarning, stacklevel=2)
        rec = BACKENDS[rec.fallback]
    current = backend_of(module)
    if current == rec.name:
        return model
    if current != "torch":
        raise ValueError(f"the model is already on backend {current!r}; load it again to put it on {rec.name!r}")
    if rec.convert is not None:
        rec.convert(module, opts)
        if release_mapped:
            release_file_mappings(module)
    return model
