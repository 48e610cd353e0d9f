"""`verispec export vllm DRAFTER OUT --target NAME`: a trained drafter folder in the layout vLLM loads for its
speculative decoding, so a drafter trained here serves at scale there (`docs/serving.md` has the command lines).

- Medusa (vLLM `vllm/model_executor/models/medusa.py`, config `vllm/transformers_utils/configs/medusa.py`):
  config `architectures: ["MedusaModel"]`, `model_type: "medusa"`, `hidden_size`, `vocab_size`, `num_heads`,
  `num_hidden_layers` (residual layers per head), `truncated_vocab_size`, `medusa_fc_bias: true` (our blocks have
  biases), `original_lm_head: true` (every head reads one output layer, as ours read the target's);
  tensors `blocks.{h}.layers.{l}.weight|bias` (H, H) / (H,), `lm_heads.0.weight` (truncated vocab, H) — the target
  output layer's rows of our draft vocabulary — and `token_map` (truncated vocab,) int64, the target id of each row.
  vLLM's Medusa proposes top-1 chains only; our trees are not carried over.
- EAGLE-3: `verispec.drafters.eagle.export_vllm` (`LlamaForCausalLMEagle3`).
- Blockwise heads have no vLLM counterpart: refused.

The folder is written to a temporary sibling and renamed into place: a failed export leaves nothing half-written.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch


def _atomic_dir(out: Path, write) -> Path:
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} exists; choose a new folder for the export")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def medusa_tensors(heads, target: torch.nn.Module) -> dict[str, torch.Tensor]:
    """vLLM's Medusa tensor names for our heads (one output layer: the target's rows of the draft vocabulary)."""
    from verispec.drafters.medusa import dense_weight

    out: dict[str, torch.Tensor] = {}
    for h, seq in enumerate(heads.heads):
        for i, block in enumerate(seq):
            out[f"blocks.{h}.layers.{i}.weight"] = block.linear.weight.detach().float().contiguous()
            out[f"blocks.{h}.layers.{i}.bias"] = block.linear.bias.detach().float().contiguous()
    with torch.no_grad():
        w = dense_weight(target.get_output_embeddings()).float()  # (V, H)
        ids = heads.vocab_ids if heads.vocab_ids is not None else torch.arange(w.shape[0])
        out["lm_heads.0.weight"] = w[ids].contiguous()  # (Vd, H)
    out["token_map"] = ids.long().contiguous()  # (Vd,)
    return out


def export_medusa(source, out, target) -> Path:
    from safetensors.torch import save_file

    from verispec.drafters.folder import load_drafter
    from verispec.drafters.medusa import MedusaHeads

    cfg, tensors, _ = load_drafter(source, "medusa", target.model)
    heads = MedusaHeads.from_tensors(cfg, tensors)
    t = medusa_tensors(heads, target.model)
    config = {"architectures": ["MedusaModel"], "model_type": "medusa", "hidden_size": heads.hidden,
              "vocab_size": int(target.vocab_size), "num_heads": heads.n_heads, "num_hidden_layers": heads.n_layers,
              "truncated_vocab_size": int(t["token_map"].numel()), "medusa_fc_bias": True, "original_lm_head": True,
              "verispec": {"target": cfg["target"], "tree": cfg.get("tree")}}

    def write(tmp: Path) -> None:
        save_file(t, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=1))

    return _atomic_dir(out, write)


def export_vllm(source, out, target) -> Path:
    """Export the drafter folder `source` (a path or name) for vLLM into the new folder `out`."""
    from verispec.drafters.folder import resolve
    from verispec.models.load import load_model

    target = load_model(target)
    kind = json.loads((resolve(source) / "config.json").read_text()).get("kind")
    if kind == "medusa":
        return export_medusa(source, out, target)
    if kind == "eagle":
        from verispec.drafters import eagle

        return eagle.export_vllm(source, out, target)
    raise ValueError(f"no vLLM layout for a {kind!r} drafter (vLLM loads medusa and eagle3 drafters)")


def vllm_command(out: Path, kind: str, target: str, k: int) -> str:
    method = {"medusa": "medusa", "eagle": "eagle3"}[kind]
    spec = json.dumps({"model": str(out), "method": method, "num_speculative_tokens": k})
    return f"vllm serve {target} --speculative-config '{spec}'"
