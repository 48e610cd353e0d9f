"""Build a model on the "gguf" backend straight from its GGUF file: the file's own blocks, no fp32 copy.

The transformers skeleton comes from the model's converted config (built on the "meta" device, so no weights are
allocated), and every tensor from the file by llama.cpp's names (blk.N.attn_q.weight -> model.layers.N.self_attn.
q_proj, ...). Llama files store q / k rows permuted for llama.cpp's rotary layout; the rows are put back in
transformers' order (a permutation of whole rows: the blocks are unchanged). Qwen2 files need no permutation.
A tied model (no output.weight) gets its output layer from the embedding's blocks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from verispec.kernels.ggml_blocks import decode

_ATTN = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
_MLP = {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def _llama_rows(n_rows: int, n_head: int) -> np.ndarray:
    """transformers' reverse permutation of llama.cpp's q / k row order, as row indices."""
    dim = n_rows // n_head // 2
    return np.arange(n_rows).reshape(n_head, dim, 2).swapaxes(2, 1).reshape(n_rows)


def read_tensors(path: Path):
    """name -> (type name, array): quantized tensors as raw rows (N, bytes), F32 tensors as float arrays."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    return arch, {t.name: (t.tensor_type.name, t.data, [int(s) for s in t.shape]) for t in reader.tensors}


def from_gguf(path: Path, config_dir: Path) -> torch.nn.Module:
    """The causal LM of GGUF file `path` on the gguf backend; `config_dir` holds its transformers config.json."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from verispec.backends.native import NativeLinear, install

    arch, tensors = read_tensors(path)
    if arch not in ("qwen2", "llama"):
        raise ValueError(f"{path.name}: architecture {arch!r}; the gguf backend runs qwen2 and llama files")
    config = AutoConfig.from_pretrained(str(config_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    def f32(name: str) -> torch.Tensor:
        kind, data, _ = tensors[name]
        if kind != "F32":
            raise ValueError(f"{path.name}: {name} is {kind}; expected F32")
        return torch.from_numpy(np.array(data, dtype=np.float32)).reshape(-1)

    def blocks(name: str, rows: np.ndarray | None = None):
        if name not in tensors:
            raise ValueError(f"{path.name}: tensor {name} is missing")
        kind, data, shape = tensors[name]
        raw = np.asarray(data)
        if rows is not None:
            raw = raw[rows]
        return decode(kind, raw, shape[0])

    print(f"[verispec] reading {path.name} into the gguf backend", file=sys.stderr, flush=True)
    linears, norms = {}, {}
    n_head, n_kv = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
    for i in range(config.num_hidden_layers):
        pre, blk = f"model.layers.{i}", f"blk.{i}"
        for hf, gg in _ATTN.items():
            rows = None
            if arch == "llama" and hf in ("q_proj", "k_proj"):
                rows = _llama_rows(tensors[f"{blk}.{gg}.weight"][2][1], n_head if hf == "q_proj" else n_kv)
            bias = f"{blk}.{gg}.bias"
            linears[f"{pre}.self_attn.{hf}"] = NativeLinear(blocks(f"{blk}.{gg}.weight", rows),
                                                            f32(bias) if bias in tensors else None)
        for hf, gg in _MLP.items():  # packed one by one: the unpacked codes of one tensor at a time
            linears[f"{pre}.mlp.{hf}"] = NativeLinear(blocks(f"{blk}.{gg}.weight"))
        norms[f"{pre}.input_layernorm.weight"] = f32(f"{blk}.attn_norm.weight")
        norms[f"{pre}.post_attention_layernorm.weight"] = f32(f"{blk}.ffn_norm.weight")
    norms["model.norm.weight"] = f32("output_norm.weight")
    embedding = blocks("token_embd.weight")
    out = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    linears["lm_head"] = NativeLinear(blocks(out))
    model = install(model, linears, embedding, norms)
    _trim()
    return model


def _trim() -> None:
    """Hand the freed unpacking buffers back to the OS (glibc keeps large freed heaps otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
