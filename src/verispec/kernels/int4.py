"""Backend "fast-int4": weight-only 4-bit linears (group-wise affine int4 weights, bf16 activations) — the cheapest
drafter on this CPU.

Lossy by design, like "fast-int8": a drafter's distribution only decides how many drafts the target accepts, never
what the output is. It never serves a target (`verispec.backends`): inputs of 4 or more rows take a separate int8
copy (below), so a row's logits would depend on how many rows share its forward.

Why int4: one drafted token is a 1-row forward, and a 1-row forward of a 0.5B model is bound by memory bandwidth —
every weight byte is read once per token. Measured on this machine (2 cores, weights not in cache, 24 Qwen2.5-0.5B
MLP blocks, `scripts/drafter_kernels.py`, two runs): fp32 packed 31–36 ms, dynamic int8 11–12 ms, int4 8–9.5 ms. The kernel is PyTorch's own CPU
weight-only int4 GEMM (`aten._weight_int4pack_mm_for_cpu`, the path torchao's int4 weight-only config and gpt-fast
use); it is fast only with bf16 activations (its fp32-activation path was ~50x slower here), so each linear rounds
its input to bf16, accumulates in fp32 inside the kernel and returns fp32.

It is not flat in rows: past ~4 rows it costs ~40 µs per row for a 896 x 4864 layer, 5x torch's dynamic int8 linear
at 150 rows (same script) — so a drafter's *prefill* of a HumanEval prompt took ~0.4 s longer than on "fast-int8" and ate the
per-token gain on short generations (measured on 20 HumanEval prompts). Each layer therefore also keeps a dynamic
int8 copy (`verispec.kernels.int8`, per-channel int8 weights from the same fp32 weights) and sends inputs of
`WIDE_ROWS` or more rows there: one-row draft steps read half the bytes, prompt-sized inputs get the fast int8 GEMM.
Both copies are lossy versions of the same layer, and a drafter only changes speed, so which one a call takes is
free. Memory: 0.63 + 1 B per weight, still 40% of fp32; `wide=False` leaves the int8 copy out.

Quantization (after Frantar et al. / gpt-fast's group-wise scheme): each output row is cut into groups of
`group_size` input columns; a group's weights map to q in 0..15 by w ≈ q·s + m with s = (max − min)/15, m = min
(the kernel's convention is w = (q − 8)·s + z, so z = m + 8s). Scales and zero points are stored in bf16.
Memory: 0.5 byte per weight plus 4 bytes per group (≈ 0.63 B/weight at group 32), against 4 B for fp32.

Two kernels: on a CPU with AVX-512 VNNI, verispec builds its own (`verispec.kernels.q4kernel`, on first use with
the machine's C++ compiler), which also rounds the activations to int8 per group of 32 and does integer dot
products; it is faster than PyTorch's at every row count (`scripts/drafter_kernels.py`: 0.031 vs 0.073 ms for one
row of a 896 x 4864 layer, 6.3 vs 7.0 ms through 24 cold MLP blocks) and took the 0.5B's draft step from 15.3–15.7
to 13.2–14.5 ms (`scripts/drafter_forward.py`). Where it cannot be built, PyTorch's kernel serves (below); a layer
says which it has (`kernel`: "q4" or "aten").

Kernel constraints (PyTorch's): the output width must be a multiple of 16 (rows are zero-padded and the padding sliced off) and
the input width a multiple of the group size (32, 64, 128 or 256); a layer that cannot meet them, or whose probe
disagrees with its own dequantized weights, stays an fp32 `FastLinear`. Where the kernel is missing altogether the
backend falls back to "fast-int8" (see `verispec.backends.apply_backend`).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from verispec.kernels.q4kernel import pack as q4_pack
from verispec.kernels.q4kernel import q4_kernel, q4_mm
from verispec.kernels.q4kernel import reference as q4_reference

GROUP_SIZES = (32, 64, 128, 256)  # what the CPU kernel accepts
DEFAULT_GROUP_SIZE = 32  # smallest error; measured no slower than 64 or 128 for a 1-row forward
# inputs with at least this many rows take the int8 copy. 16, not 4: batched drafting feeds 8-row steps, and there the
# int4 kernel is as fast as int8 on the body and reads half the bytes of the 151,936-row output layer (0.5B, 2-core
# Intel VM of 2026-12-03: 5.5 against 9.2 ms; batched sd at 8 streams 22.9-24.6 against 21.7-21.8 tok/s)
WIDE_ROWS = 16


def _kernel_ok() -> bool:
    ops = torch.ops.aten
    return hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")


@functools.lru_cache(maxsize=1)
def int4_available() -> bool:
    """Whether this torch build runs the CPU int4 weight-only kernel (probed once on a 16 x 32 layer)."""
    if not _kernel_ok():
        return False
    try:
        lin = nn.Linear(32, 16, bias=False)
        return Int4Linear.from_linear(lin, wide=False) is not None
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def _int4_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """(M, K) bf16 @ packed int4 (N_pad, K) -> (M, N_pad) bf16: PyTorch's CPU weight-only int4 GEMM."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)


def quantize_groups(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Affine 4-bit group quantization of a (N, K) weight: q (N, K) int32 in 0..15, scale (N, K/g), min (N, K/g).

    The dequantized weight is q * scale + min, group by group. Computed in fp32; the scale is rounded to bf16 first
    (that is how the kernel stores it) so q is chosen against the scale actually used.
    """
    N, K = weight.shape
    w = weight.detach().float().reshape(N, K // group_size, group_size)  # (N, G, g)
    lo, hi = w.amin(-1), w.amax(-1)  # (N, G)
    scale = ((hi - lo) / 15).clamp(min=1e-8).to(torch.bfloat16).float()  # (N, G)
    lo = lo.to(torch.bfloat16).float()
    q = torch.clamp(torch.round((w - lo[..., None]) / scale[..., None]), 0, 15).to(torch.int32)  # (N, G, g)
    return q.reshape(N, K), scale, lo


class Int4Linear(nn.Module):
    """y = x Wᵀ + b with W stored as packed 4-bit groups (weight-only int4, bf16 activations, fp32 output)."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor | tuple, bias: torch.Tensor | None,
                 in_features: int, out_features: int, group_size: int, kernel: str = "aten"):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.kernel = kernel
        self.register_buffer("packed", packed)  # "aten": opaque layout (N_pad, K / 2); "q4": (N_pad / 16, G, 256)
        if kernel == "q4":  # fp16 scales and minima, (N_pad / 16, G, 16) each (kernels.q4kernel.pack)
            self.register_buffer("scales", scales_and_zeros[0])
            self.register_buffer("mins", scales_and_zeros[1])
        else:
            self.register_buffer("scales_and_zeros", scales_and_zeros)  # (K / g, N_pad, 2) bf16
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)  # (N,) fp32
        self.wide: nn.Module | None = None  # int8 copy for inputs of >= WIDE_ROWS rows (None: int4 for all)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, lin: nn.Module, group_size: int = DEFAULT_GROUP_SIZE, verify: bool = True,
                    wide: bool = True) -> "Int4Linear | None":
        """Quantize an fp32 nn.Linear; None when the kernel cannot take it (shape) or its probe disagrees.
        wide=True also keeps a dynamic int8 copy for inputs of WIDE_ROWS or more rows (where int8 is available)."""
        weight = lin.weight.detach()
        N, K = weight.shape
        if group_size not in GROUP_SIZES or K % group_size or not _kernel_ok():
            return None
        q, scale, lo = quantize_groups(weight, group_size)  # (N, K), (N, G), (N, G)
        pad = -N % 16  # the kernel packs output rows in blocks of 16
        if pad:
            q = torch.cat([q, q.new_zeros(pad, K)])
            scale = torch.cat([scale, scale.new_ones(pad, scale.shape[1])])
            lo = torch.cat([lo, lo.new_zeros(pad, lo.shape[1])])
        bias = None if lin.bias is None else lin.bias.detach().float().clone()
        if group_size == 32 and q4_kernel() is not None:  # our VNNI kernel (kernels.q4kernel): int8 activations
            w, d, m = q4_pack(q, scale, lo)
            layer = cls(w, (d, m), bias, K, N, group_size, kernel="q4")
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
            zero = lo + 8 * scale  # kernel convention: w = (q - 8) * scale + zero
            sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)  # (G, N_pad, 2)
            layer = cls(packed, sz, bias, K, N, group_size)
        if verify:
            deq = (q[:N].reshape(N, -1, group_size).float() * scale[:N, :, None] + lo[:N, :, None]).reshape(N, K)
            x = torch.randn(2, K, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).float()  # (2, K)
            try:
                got = layer(x)  # (2, N)
            except (RuntimeError, NotImplementedError):
                return None
            if layer.kernel == "q4":  # int8 activations: compare with the kernel's own formula, tightly
                ref = q4_reference(x, layer.packed, layer.scales, layer.mins)[:, :N]  # (2, N)
                ref = ref if bias is None else ref + bias
                # fp32 sums in another order; the min terms may cancel, so the tolerance scales with Σ|x|·|w|
                ok = torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * float((x.abs() @ deq.abs().T).max()) + 1e-6)
            else:
                ref = torch.nn.functional.linear(x, deq, bias)  # (2, N)
                ok = torch.allclose(got, ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()) + 1e-6)
            if not ok:
                return None
        if wide:
            layer.wide = _int8_copy(lin)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K = self.in_features
        if x.shape[-1] != K:
            raise RuntimeError(f"Int4Linear: input has {x.shape[-1]} features, layer expects {K}")
        if self.wide is not None and x.numel() >= WIDE_ROWS * K and x.dtype == torch.float32:
            return self.wide(x)  # (..., N) a prompt-sized input: the int8 GEMM is ~5x faster there
        return self.narrow(x)

    def narrow(self, x: torch.Tensor) -> torch.Tensor:
        """The int4 kernel for any number of rows (forward() sends wide inputs to the int8 copy instead)."""
        N, K = self.out_features, self.in_features
        lead = x.shape[:-1]
        out_dtype = x.dtype if x.dtype.is_floating_point else torch.float32
        if self.kernel == "q4":
            x2 = x.reshape(-1, K).float().contiguous()  # (M, K)
            y = q4_mm(x2, self.packed, self.scales, self.mins)  # (M, N_pad) fp32
        else:
            x2 = x.reshape(-1, K).to(torch.bfloat16, memory_format=torch.contiguous_format)  # (M, K): the fast path
            if x2.shape[0] == 0:
                return x.new_zeros(*lead, N, dtype=out_dtype)
            y = _int4_mm(x2, self.packed, self.group_size, self.scales_and_zeros)  # (M, N_pad) bf16
        if y.shape[1] != N:
            y = y[:, :N]  # (M, N) drop the rows padded to a multiple of 16
        y = y.to(out_dtype)  # (M, N) a new tensor: the bias is added in place
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*lead, N)

    def extra_repr(self) -> str:
        eng = getattr(self.wide, "_vs_engine", None)
        wide = (f", int8 copy for >= {WIDE_ROWS} rows{f' ({eng})' if eng else ''}" if self.wide is not None
                else "")
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"bias={self.bias is not None}, kernel={self.kernel}{wide}")


def _int8_copy(lin: nn.Module) -> nn.Module | None:
    """A dynamically quantized int8 copy of `lin` (as backend "fast-int8" makes it), or None without int8."""
    from verispec.kernels.int8 import int8_available, quantize_int8, wide_engine

    if not int8_available():
        return None
    dense = torch.nn.utils.skip_init(nn.Linear, lin.in_features, lin.out_features, bias=lin.bias is not None)
    with torch.no_grad():
        dense.weight.copy_(lin.weight)
        if lin.bias is not None:
            dense.bias.copy_(lin.bias)  # a private copy: the packed params keep the bias tensor itself
    holder = nn.Sequential(dense)
    engine = wide_engine()
    quantize_int8(holder, ["0"], engine=engine)
    holder[0]._vs_engine = engine or torch.backends.quantized.engine  # named in reports
    return holder[0]


def quantize_linears(root: nn.Module, keep: tuple[str, ...] = ()) -> int:
    """Replace every nn.Linear under `root` by its Int4Linear (in place) where the kernel takes it, except the
    children of `root` named in `keep`; returns how many were replaced. For drafter-side weights only (trained
    heads): like every drafter backend this changes which tokens are drafted, never what the verifier keeps."""
    n = 0
    for name, child in list(root.named_children()):
        if name in keep:
            continue
        if type(child) is nn.Linear:
            q = Int4Linear.from_linear(child)
            if q is not None:
                setattr(root, name, q)
                n += 1
        else:
            n += quantize_linears(child)
    return n
