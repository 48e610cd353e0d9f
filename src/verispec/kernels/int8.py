"""Backend "fast-int8": dynamically quantized linears (int8 weights, int8 activations per call) — a cheap drafter.

Lossy by design. A drafter's distribution only decides how many drafts the target accepts, never what the output
is (the verifier keeps the target's distribution exactly), so a drafter may trade accuracy for speed. A measurement
on a 2-core Zen 3 machine (2026-11-22) found `torch.ao.quantization.quantize_dynamic` at 0.61 ms for one row of
Qwen-1.5B's gate projection versus 3.44 ms for the fp32 default — the cheapest path found there, at ~2e-2 relative
error. Its effect on the acceptance rate has to be measured per drafter. It never serves a target
(`verispec.backends`): the activation scale is taken over all rows of a call, so a row's logits depend on the other
rows scored with it.

Weights are quantized per output channel (symmetric int8, one scale per row), activations per call (per-tensor,
from the observed range), accumulation in int32, output fp32 (FBGEMM / x86 engine on this CPU). The API is
torch's eager-mode dynamic quantization: deprecated in torch 2.13 in favour of torchao (it warns; the warning is
silenced here), still present and working in the pinned torch. Each quantized layer keeps `in_features` and
`out_features`. The dense fp32 weights are dropped (int8 is 1/4 of their memory).
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn


def int8_available() -> bool:
    """Whether this torch build has a CPU engine for dynamically quantized int8 linears."""
    try:
        return any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm", "onednn"))
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=1)
def wide_engine() -> str | None:
    """The quantized engine to pack int8 copies for many-row inputs with: "onednn" where the CPU has AMX int8 (oneDNN
    runs those GEMMs on AMX tiles: measured 2.4x / 5.6x FBGEMM's speed at 140 / 1100 rows of the 0.5B drafter's
    gate projection on a 2-core Xeon, the same error), else None (torch's default engine). A packed weight keeps
    its engine, so the global setting is only changed while packing."""
    from verispec.kernels.cpu import cpu_flags

    try:
        ok = "onednn" in torch.backends.quantized.supported_engines
    except (AttributeError, RuntimeError):
        return None
    return "onednn" if ok and "amx_int8" in cpu_flags() else None


def quantize_int8(module: nn.Module, names: list[str], engine: str | None = None) -> int:
    """Replace the nn.Linear submodules named in `names` by dynamically quantized int8 linears, in place (packed
    for `engine`, None = the current one)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    if not names:
        return 0
    before = torch.backends.quantized.engine
    try:
        if engine is not None:
            torch.backends.quantized.engine = engine
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch 2.13 deprecates eager quantization (moving to torchao)
            quantize_dynamic(module, {n: per_channel_dynamic_qconfig for n in names}, dtype=torch.qint8,
                             inplace=True)
    finally:
        torch.backends.quantized.engine = before
    return len(names)


def is_int8_linear(m: nn.Module) -> bool:
    try:
        from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
    except ImportError:  # pragma: no cover - quantization removed from torch
        return False
    return isinstance(m, DynamicQuantizedLinear)
