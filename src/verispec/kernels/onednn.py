"""A drop-in `nn.Linear` that multiplies with a oneDNN pre-packed fp32 weight (inference only).

Why: verification feeds k = γ + 1 tokens through the target at once, and speculative decoding only pays when that
costs about one decode step. With torch defaults on this CPU it does not: a measurement on a 2-core Zen 3 machine
(2026-11-22) found a single fp32 `F.linear` (MKL) of Qwen2.5-1.5B's gate projection at 3.44 ms for 1 row but 7.03 ms for 2 rows and 10.3 ms
for 16 (MKL leaves its bandwidth-bound GEMV path at 2 rows and takes slow paths on AMD), while oneDNN with a
weight reordered once into its blocked layout measured 2.70 / 3.26 / 5.63 ms — flat enough that the weight read
dominates, as it should for a few rows — at fp32 accuracy (1e-6 vs fp64). Those are the motivation; what this
module achieves on a given machine is measured by `verispec.bench.measure`.

How: `torch.ops.mkldnn._reorder_linear_weight(W)` once (W: (N, K) fp32 -> an opaque mkldnn tensor in oneDNN's
blocked layout), then `torch.ops.mkldnn._linear_pointwise(x, W_packed, bias, "none", [], "")` per call (x: (M, K)
fp32, dense). The dense weight is dropped after packing, so the model's resident weight memory is not doubled.

Fallback: the pure-torch path `F.linear(x, W, bias)` with a dense weight. It is taken when mkldnn is unavailable
(`torch.backends.mkldnn.is_available()`), when packing raises or the packed product disagrees with `F.linear` on a
probe row at conversion, when forced (`force_fallback=True` or the environment variable
`VERISPEC_FORCE_TORCH_LINEAR=1`), and, permanently for that layer, the first time the packed op raises at run time
(the dense weight is then rebuilt from the packed one with `to_dense()`, so memory stays one copy).

`dtype=torch.bfloat16` (backend "fast-bf16", lossy, meant for drafters) packs a bf16 copy of the weight instead
(half the bytes) and rounds each input to bf16; oneDNN accumulates in fp32 and the output is cast back.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

FORCE_FALLBACK_ENV = "VERISPEC_FORCE_TORCH_LINEAR"


def fallback_forced() -> bool:
    """True when the environment asks every fast linear built from now on to use the pure-torch path."""
    return os.environ.get(FORCE_FALLBACK_ENV, "").strip().lower() not in ("", "0", "false", "no")


def onednn_available() -> bool:
    """Whether this torch build can run oneDNN's packed fp32 linear on the CPU."""
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise") \
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    except (AttributeError, RuntimeError):
        return False


def pack_weight(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, K) dense weight -> opaque mkldnn tensor (N, K) of `dtype` in oneDNN's blocked layout (a new copy)."""
    # No batch-size hint: the generic format serves every row count; hinting one M slowed other M's in a probe.
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype).contiguous())


def packed_linear(x2: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x2: (M, K) in the packed weight's dtype -> (M, N) (no activation fused: attr "none")."""
    return torch.ops.mkldnn._linear_pointwise(x2, packed, bias, "none", [], "")


class FastLinear(nn.Module):
    """y = x W^T + b with W held either packed for oneDNN (fast path) or dense (pure-torch fallback).

    Keeps `in_features` and `out_features` like nn.Linear. `weight` reads the held weight (an opaque mkldnn tensor
    on the fast path: shape/dtype work, arithmetic does not — use `dense_weight()`). `state_dict()` writes a dense
    `weight` as nn.Linear does, and loading one repacks it. Inference only: the packed op has no backward.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, force_fallback: bool = False,
                 verify: bool = True, dtype: torch.dtype = torch.float32):
        super().__init__()
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"FastLinear computes in float32 or bfloat16, not {dtype}")
        self.dtype = dtype  # storage and multiply dtype; bfloat16 is lossy (a cheap drafter), float32 is exact fp32
        self.out_features, self.in_features = (int(s) for s in weight.shape)  # weight: (N, K)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.float32), requires_grad=False)
        self.packed: torch.Tensor | None = None  # (N, K) opaque mkldnn tensor, fast path
        self.dense: torch.Tensor | None = None  # (N, K) dense, fallback path
        self.fallback_reason: str | None = None
        self.force_fallback = force_fallback
        self._set_weight(weight, verify=verify)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kw) -> FastLinear:
        return cls(linear.weight, linear.bias, **kw)

    # -- weight handling ------------------------------------------------------------------------------------------
    def _set_weight(self, weight: torch.Tensor, *, verify: bool) -> None:
        w = weight.detach()  # (N, K)
        self._refresh_bias()
        self.packed, self.dense, self.fallback_reason = None, None, None
        reason = None
        if self.force_fallback or fallback_forced():
            reason = "forced"
        elif not onednn_available():
            reason = "oneDNN (mkldnn) is not available in this torch build"
        elif w.device.type != "cpu" or not w.is_floating_point():
            reason = f"weight is {w.dtype} on {w.device}; the packed path is for CPU floating-point weights"
        else:
            try:
                packed = pack_weight(w, self.dtype)
                if verify:
                    self._check(packed, w)
                self.packed = packed
            except Exception as e:  # noqa: BLE001 - any failure of the optional fast path means: use the fallback
                reason = f"oneDNN packing failed: {type(e).__name__}: {e}"
        if self.packed is None:
            self.fallback_reason = reason
            self.dense = w.to(self.dtype).contiguous()  # fp32: keeps (shares) the dense weight, one copy either way

    def _refresh_bias(self) -> None:
        # (N,) bias in the multiply dtype: the parameter itself for fp32 (no copy, so it cannot pin a stale or
        # memory-mapped storage), a small bf16 copy otherwise
        self._bias_bf16 = None if self.bias is None or self.dtype == torch.float32 else \
            self.bias.detach().to(self.dtype)

    @property
    def _bias_c(self) -> torch.Tensor | None:
        return self.bias if self._bias_bf16 is None else self._bias_bf16

    def _check(self, packed: torch.Tensor, w: torch.Tensor) -> None:
        """Two probe rows through both paths; a packed product that disagrees with F.linear is not used."""
        x = torch.randn(2, self.in_features, generator=torch.Generator().manual_seed(0))  # (2, K)
        with torch.no_grad():
            got = packed_linear(x.to(self.dtype), packed, self._bias_c).float()  # (2, N)
            ref = F.linear(x, w.to(torch.float32), self.bias)  # (2, N)
        # fp32 reorderings of the K-term sums differ by ~1e-6 relative, bf16 rounding by ~1e-2; these tolerances
        # still reject a wrong kernel or layout (errors of order 1)
        rel = 1e-4 if self.dtype == torch.float32 else 5e-2
        err, tol = float((got - ref).abs().max()), rel * (float(ref.abs().max()) + 1.0)
        if not err <= tol:
            raise RuntimeError(f"packed product differs from F.linear by {err:.3g} (tolerance {tol:.3g})")

    def dense_weight(self) -> torch.Tensor:
        """(N, K) dense weight in `self.dtype` (a fresh copy when packed)."""
        return self.dense if self.packed is None else self.packed.to_dense()

    @property
    def weight(self) -> torch.Tensor:
        return self.dense if self.packed is None else self.packed

    @property
    def is_packed(self) -> bool:
        return self.packed is not None

    def _fall_back(self, err: Exception) -> None:
        warnings.warn(f"verispec: oneDNN packed linear failed ({type(err).__name__}: {err}); this layer now uses "
                      f"F.linear with a dense weight", RuntimeWarning, stacklevel=3)
        self.dense = self.packed.to_dense()  # (N, K); replaces the packed copy, memory stays one copy
        self.packed = None
        self.fallback_reason = f"runtime error: {type(err).__name__}: {err}"

    # -- forward ----------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., K)
        if self.packed is None:
            if self.dtype == torch.float32:
                return F.linear(x, self.dense.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
            return F.linear(x.to(self.dtype), self.dense, self._bias_c).to(x.dtype)  # bf16 multiply, as packed
        if x.requires_grad and torch.is_grad_enabled():
            # the packed op has no autograd formula: a differentiable call gets a temporary dense weight
            w = self.packed.to_dense().to(x.dtype)  # (N, K)
            return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, K); copies only when x is not viewable as 2-D (non-contiguous)
        if x2.shape[0] == 0:
            return x.new_zeros(*lead, self.out_features)
        dtype = x2.dtype
        if dtype != self.dtype:
            x2 = x2.to(self.dtype)  # multiply in the packed weight's dtype (fp32, or bf16 for a cheap drafter)
        try:
            y = packed_linear(x2, self.packed, self._bias_c)  # (M, N), fp32 accumulation inside oneDNN
        except Exception as e:  # noqa: BLE001 - fall back for good on this layer, then answer this call
            self._fall_back(e)
            return self.forward(x)
        return y.to(dtype).reshape(*lead, self.out_features)  # (..., N)

    def extra_repr(self) -> str:
        path = "onednn-packed" if self.packed is not None else f"torch-fallback ({self.fallback_reason})"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"dtype={str(self.dtype).removeprefix('torch.')}, path={path}"

    # -- copying and (de)serialisation: opaque mkldnn tensors have no storage to copy, so go through dense ----------
    def __deepcopy__(self, memo):
        bias = None if self.bias is None else self.bias.detach().clone()
        new = FastLinear(self.dense_weight().clone(), bias, force_fallback=self.force_fallback, verify=False,
                         dtype=self.dtype)
        new.training = self.training
        memo[id(self)] = new
        return new

    def __getstate__(self):
        state = self.__dict__.copy()
        if self.packed is not None:
            state["packed"], state["_pickled_dense"] = None, self.packed.to_dense()  # (N, K)
        return state

    def __setstate__(self, state):
        dense = state.pop("_pickled_dense", None)
        super().__setstate__(state)
        if dense is not None:
            self._set_weight(dense, verify=False)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.dense_weight() if keep_vars else self.dense_weight().detach()
        super()._save_to_state_dict(destination, prefix, keep_vars)  # the bias parameter

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key in state_dict:
            w = state_dict[key]
            if tuple(w.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {key}: {tuple(w.shape)} vs "
                                  f"{(self.out_features, self.in_features)}")
            else:
                self._set_weight(w, verify=False)
        elif strict:
            missing_keys.append(key)
        rest = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._refresh_bias()
