"""What a converted model holds in memory: releasing file-mapped weights after conversion, counting weights held in
packed / quantized layers (which are not nn.Parameters), and finding a tied output layer."""

from __future__ import annotations

import bisect

import torch
from torch import nn

from verispec.kernels.int4 import Int4Linear
from verispec.kernels.int8 import is_int8_linear
from verispec.kernels.onednn import FastLinear


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


def tied_output_weight(module: nn.Module) -> torch.Tensor | None:
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


def unwrap(model) -> nn.Module:
    """The nn.Module of `model` (itself, or a verispec LoadedModel's `.model`)."""
    return model if isinstance(model, nn.Module) else getattr(model, "model", None)


def weight_count(model) -> int:
    """Parameters plus the weights of FastLinear / int8 / int4 / native GGUF layers (held as packed tensors, not
    Parameters)."""
    from verispec.backends.native import NativeEmbedding, NativeLinear

    module = unwrap(model)
    n = sum(p.numel() for p in module.parameters())
    n += sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, NativeLinear))
    n += sum(m.num_embeddings * m.embedding_dim for m in module.modules() if isinstance(m, NativeEmbedding))
    copies = {id(m.wide) for m in module.modules() if isinstance(m, Int4Linear) and m.wide is not None}
    return n + sum(m.in_features * m.out_features for m in module.modules()
                   if (isinstance(m, (FastLinear, Int4Linear)) or is_int8_linear(m)) and id(m) not in copies)
