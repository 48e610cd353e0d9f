"""Fuse sibling projections that read the same input (q/k/v; gate/up) into one linear layer.

A one-row drafter forward of Qwen2.5-0.5B on "fast-int4" makes 169 linear calls; each pays a fixed cost around its
kernel (dispatch, the bf16 round of its input, the fp32 copy of its output), and small output widths use the kernel
poorly (k/v are 128 wide). Concatenating q, k and v (and gate and up) along the output dimension leaves 97 calls
with wider outputs (T(1) 17.1–17.6 → 16.3–16.5 ms through transformers' forward, `scripts/drafter_forward.py`).
Each output column still depends only on its own weight row, so a quantized fused layer holds
the same per-row groups as the separate ones would.

The model's own forward keeps working: the old attributes (`q_proj`, ...) become `FusedPart`s, each returning its
slice of the fused layer's output. The first part computes the fused product and keeps it for the next parts
called on the very same input tensor (as transformers' Llama-family attention and MLP do), so one forward computes
each fused product once; a part called on another input computes its own product. `verispec.rewrites.lean` calls
the fused layer directly.

Applied only with the lossy drafter backends (see `verispec.backends.apply_backend`), and only to the model
families whose attention and MLP forwards are known to call the parts on one input (`FUSABLE_TYPES`): a fused fp32
layer may sum in another order than the separate ones, and the exact "fast" target must not change.
"""

from __future__ import annotations

import torch
from torch import nn

FUSABLE_TYPES = ("qwen2", "llama")  # config.model_type values whose attention / MLP forwards are known
GROUPS = (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("gate_up_proj", ("gate_proj", "up_proj")))


class FusedGroup:
    """The fused layer `getattr(parent, name)` and the output slice of each part; remembers its last product."""

    def __init__(self, parent: nn.Module, name: str, sizes: list[int]):
        self.parent, self.name, self.sizes = parent, name, sizes
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None

    @property
    def linear(self) -> nn.Module:
        return getattr(self.parent, self.name)  # looked up per call: a backend may have swapped it

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        """The parts' outputs from a fused output (..., sum(sizes)): views, in part order."""
        return list(y.split(self.sizes, dim=-1))

    def part(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if x is not self._x:
            self._x, self._y = x, self.linear(x)  # (..., sum(sizes))
        y = self._y
        if i == len(self.sizes) - 1:
            self._x = self._y = None  # the last part: do not pin the tensors after this forward
        return y[..., self.offsets[i]:self.offsets[i] + self.sizes[i]]  # (..., sizes[i])


class FusedPart(nn.Module):
    """What was a projection of its own: slice `index` of a fused layer's output."""

    def __init__(self, group: FusedGroup, index: int, in_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, group.sizes[index]
        self.index = index
        self.__dict__["group"] = group  # not a submodule: the fused layer is registered once, on the parent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.part(x, self.index)

    def extra_repr(self) -> str:
        return f"part {self.index} of {self.group.name}, out_features={self.out_features}"


def fusable(module: nn.Module) -> bool:
    config = getattr(module, "config", None)
    return getattr(config, "model_type", None) in FUSABLE_TYPES


@torch.no_grad()
def fuse_projections(module: nn.Module) -> int:
    """Fuse q/k/v and gate/up of every attention / MLP block of a fusable model, in place; return groups fused.

    Only fp32 `nn.Linear` parts with the same input width and all with or all without bias are fused; anything
    else (already fused, converted, or another model family) is left as it is.
    """
    if not fusable(module):
        return 0
    fused = 0
    for parent in list(module.modules()):
        for name, part_names in GROUPS:
            parts = [getattr(parent, p, None) for p in part_names]
            if not all(type(p) is nn.Linear and p.weight.dtype == torch.float32 for p in parts):
                continue
            if len({p.in_features for p in parts}) != 1 or len({p.bias is None for p in parts}) != 1:
                continue
            weight = torch.cat([p.weight for p in parts])  # (sum N_i, K)
            bias = None if parts[0].bias is None else torch.cat([p.bias for p in parts])  # (sum N_i,)
            lin = torch.nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None)
            lin.weight = nn.Parameter(weight, requires_grad=False)
            if bias is not None:
                lin.bias = nn.Parameter(bias, requires_grad=False)
            parent.add_module(name, lin)
            group = FusedGroup(parent, name, [p.out_features for p in parts])
            for i, p in enumerate(part_names):
                setattr(parent, p, FusedPart(group, i, weight.shape[1]))
            fused += 1
    return fused


def fused_group(parent: nn.Module, first_part: str) -> FusedGroup | None:
    """The FusedGroup behind `parent.<first_part>`, or None when that projection is not fused."""
    part = getattr(parent, first_part, None)
    return part.group if isinstance(part, FusedPart) else None
