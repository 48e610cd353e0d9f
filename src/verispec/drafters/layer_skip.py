"""Self-speculative decoding by layer skipping: Zhang et al. 2024, "Draft & Verify: Lossless Large Language Model
Acceleration via Self-Speculative Decoding" (ACL), with the skip set found as SWIFT does it on the fly (Xia et al.
2025, "SWIFT: On-the-Fly Self-Speculative Decoding for LLM Inference Acceleration") or offline.

The drafter is the target itself with a set S of its decoder layers skipped: the same module objects (the same
weight tensors, no second copy in memory — the drafter's CachedLM binds a *view* of the target's decoder that
lists only the kept layers), its own small KV cache for the kept layers, and the target's output layer. Its drafts
are verified by the full target as any draft model's, and each token hands over the exact q it was sampled from,
so the method is lossless whatever S is; S only decides speed.

Where S comes from (option `skip`):
- `skip="3,7,11"`: these layers (0-based).
- `skip="bi"`: on the fly, from the first prompt this target sees: ShortGPT's block influence (Men et al. 2024)
  BI_l = 1 − mean_t cos(x_l, x_{l+1}) of each layer's input and output hidden states in one full pass over the
  prompt; the `ratio` share of layers with the lowest BI is skipped (never the first or the last layer, which
  every study finds essential). It is computed once per target per process.
- `skip="auto"` (default): the set `verispec train layer-skip` searched offline for this target, cached under the
  verispec home by target name and weights fingerprint; `bi` when there is none.

The offline search (`search_skip_set`) is Draft & Verify's objective with a greedy search instead of Bayesian
optimisation: grow S one layer at a time, each time adding the layer whose removal keeps the skipped model's
greedy token agreeing with the full model's most often on calibration text (teacher-forced, one forward per
candidate); along that path keep the S that maximises the predicted speedup E(α, γ) / (γ·c(S) + 1), with
α the agreement and c(S) the cost of a skipped forward relative to a full one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path

import torch

from verispec.cache import CachedLM
from verispec.drafters.draft_model import DraftModelDrafter
from verispec.validate import check_unit


def decoder_of(lm: CachedLM):
    """The chain decoder a CachedLM runs (the gguf backend's NativeDecoder or the lean one); layer skipping needs
    one of them, since transformers' own forward has no way to leave layers out."""
    if lm.lean is None or not hasattr(lm.lean, "layers"):
        raise ValueError("layer-skip needs a Llama-family target (Qwen2, Llama) that verispec's own decoder runs "
                         f"(the gguf backend or the lean decoder); {type(lm.model).__name__} is not one")
    return lm.lean


def skip_view(decoder, keep: list[int]):
    """The same decoder over the kept layers only: a shallow copy sharing every module and weight."""
    view = copy.copy(decoder)
    view.layers = [decoder.layers[i] for i in keep]
    if hasattr(decoder, "blocks"):  # the lean decoder's per-layer bundles
        view.blocks = [decoder.blocks[i] for i in keep]
    return view


def parse_skip(skip, n_layers: int) -> list[int] | None:
    """'3,7,11' or a list -> sorted layer indices; None for the named modes."""
    if skip in ("auto", "bi"):
        return None
    parts = str(skip).split(",") if isinstance(skip, (str, int)) else list(skip)
    try:
        out = sorted({int(p) for p in parts if str(p).strip() != ""})
    except (TypeError, ValueError):
        out = None
    if not out or any(not 0 <= i < n_layers for i in out) or len(out) >= n_layers:
        raise ValueError(f"skip must be 'auto', 'bi' or layer indices in [0, {n_layers}) leaving at least one "
                         f"layer, e.g. '3,7,11'; got {skip!r}")
    return out


@torch.inference_mode()
def block_influence(model: torch.nn.Module, ids: list[int]) -> list[float]:
    """ShortGPT's BI of every decoder layer on `ids`: 1 − mean cosine between its input and output hidden states."""
    body = model.get_decoder()
    seen: list[torch.Tensor] = []
    hooks = [layer.input_layernorm.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(
        -1, a[0].shape[-1]).float())) for layer in body.layers]
    hooks.append(body.norm.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(
        -1, a[0].shape[-1]).float())))
    try:
        lm = CachedLM(model)
        lm.forward(ids, n_logits=1)
    finally:
        for h in hooks:
            h.remove()
    xs = seen[-(len(body.layers) + 1):]  # (T, H) each: the residual stream before each layer, then after the last
    return [float(1 - torch.nn.functional.cosine_similarity(a, b, dim=-1).mean()) for a, b in zip(xs, xs[1:])]


def lowest_bi(bi: list[float], ratio: float) -> list[int]:
    """The `ratio` share of layers with the lowest BI (at least one), never layer 0, nor the last unless the model
    has only two."""
    n = len(bi)
    if n < 2:
        raise ValueError("layer-skip needs a target with at least two decoder layers")
    allowed = range(1, n - 1) if n > 2 else range(1, n)
    k = min(len(allowed), max(1, int(round(ratio * n))))
    return sorted(sorted(allowed, key=lambda i: bi[i])[:k])


def fingerprint(model: torch.nn.Module) -> str:
    """A cheap identity of a model's weights: sha256 over its config and a sample of every parameter / buffer."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, t in list(model.state_dict().items()):
        h.update(name.encode())
        flat = t.reshape(-1)
        h.update(flat[:: max(1, flat.numel() // 64)][:64].float().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_path(name: str, model: torch.nn.Module) -> Path:
    from verispec.home import cache_root

    return cache_root() / "layer-skip" / f"{name}-{fingerprint(model)}.json"


def load_searched(name: str, model: torch.nn.Module) -> list[int] | None:
    path = cache_path(name, model)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        skip = [int(i) for i in record["skip"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"the cached layer-skip set {path} is corrupted ({e}); delete it or run "
                         "`verispec train layer-skip` again") from e
    return parse_skip(skip, len(model.get_decoder().layers))


class LayerSkipDrafter(DraftModelDrafter):
    name = "layer_skip"

    def __init__(self, target: torch.nn.Module, vocab_size: int, stop_ids: frozenset[int] = frozenset(),
                 skip="auto", ratio: float = 0.5, target_name: str = "model"):
        self.lm = CachedLM(target, vocab_size, lean=True)
        self.stop_ids = frozenset(stop_ids)
        self.full = decoder_of(self.lm)
        self.n_layers = len(self.full.layers)
        self.ratio = check_unit("ratio", ratio, lo_open=True, hi_open=True)
        self.mode = skip if skip in ("auto", "bi") else "given"
        self.skip = parse_skip(skip, self.n_layers)
        if self.skip is None and self.mode == "auto":
            self.skip = load_searched(target_name, target)
            self.mode = "searched" if self.skip is not None else "bi"
        if self.skip is not None:
            self._bind(self.skip)

    @classmethod
    def from_ctx(cls, ctx) -> "LayerSkipDrafter":
        return cls(ctx.target.model, ctx.target.vocab_size, ctx.stop_ids, target_name=ctx.target.name,
                   **ctx.options)

    def _bind(self, skip: list[int]) -> None:
        self.skip = skip
        self.lm.lean = skip_view(self.full, [i for i in range(self.n_layers) if i not in set(skip)])

    def prefill(self, tokens):
        if self.skip is None:  # skip="bi": once per target per process, from the first prompt it drafts for
            memo = self.lm.model.__dict__.setdefault("_verispec_layer_skip_bi", {})
            if self.ratio not in memo:
                memo[self.ratio] = lowest_bi(block_influence(self.lm.model, list(tokens)), self.ratio)
            self._bind(memo[self.ratio])
        super().prefill(tokens)


# -- the offline search (`verispec train layer-skip`) ------------------------------------------------------------


def head_share(model: torch.nn.Module) -> float:
    """The output layer's share of a forward's multiply-adds per token (the part no layer skip saves)."""
    head = model.get_output_embeddings()
    V = int(getattr(head, "out_features", None) or head.weight.shape[0])
    H = model.config.hidden_size
    cfg = model.config
    kv = cfg.num_key_value_heads * (H // cfg.num_attention_heads)
    per_layer = H * (H + 2 * kv + H) + 3 * H * cfg.intermediate_size
    return V * H / (V * H + cfg.num_hidden_layers * per_layer)


def predicted_speedup(alpha: float, c: float, gamma_max: int = 8, slope: float = 0.04) -> tuple[float, int]:
    """Best (speedup, γ) for per-token acceptance α and relative draft cost c; verifying k tokens costs
    1 + slope·(k − 1) target forwards (measured ~4% per token on this CPU)."""
    best = (0.0, 1)
    for g in range(1, gamma_max + 1):
        E = (1 - alpha ** (g + 1)) / (1 - alpha) if alpha < 1 else g + 1
        best = max(best, (E / (g * c + 1 + slope * g), g))
    return best


@torch.inference_mode()
def agreement(model: torch.nn.Module, ids: list[int], reference: torch.Tensor, skip: list[int]) -> float:
    """Share of positions where the model with `skip` left out picks the same greedy token as the full model."""
    lm = CachedLM(model, lean=True)
    full = decoder_of(lm)
    lm.lean = skip_view(full, [i for i in range(len(full.layers)) if i not in set(skip)])
    top = lm.forward(ids, n_logits=len(ids)).argmax(-1)  # (T,)
    return float((top == reference).float().mean())


@torch.inference_mode()
def search_skip_set(model: torch.nn.Module, ids: list[int], *, max_ratio: float = 0.6, pool: int = 8,
                    minutes: float = 10.0, progress=print) -> dict:
    """Greedy search of the skip set on calibration ids (see the module docstring); returns the record cached by
    `verispec train layer-skip`: the chosen set, its agreement, cost and predicted speedup, and the whole path."""
    t0 = time.perf_counter()
    reference = CachedLM(model, lean=True).forward(ids, n_logits=len(ids)).argmax(-1)  # (T,)
    bi = block_influence(model, ids)
    L = len(bi)
    h = head_share(model)
    S: list[int] = []
    path = []
    while len(S) < min(L - 2, int(max_ratio * L)) and time.perf_counter() - t0 < minutes * 60:
        cands = sorted((i for i in range(1, L - 1) if i not in S), key=lambda i: bi[i])[:pool]
        scored = [(agreement(model, ids, reference, S + [i]), i) for i in cands]
        a, best = max(scored)
        S = sorted(S + [best])
        c = h + (1 - h) * (L - len(S)) / L
        speed, gamma = predicted_speedup(a, c)
        path.append({"skip": list(S), "alpha": round(a, 4), "c": round(c, 4), "speedup": round(speed, 3),
                     "gamma": gamma})
        progress(f"skip {len(S):2d} layers: +{best:2d}  agreement {a:.3f}  c {c:.3f}  predicted {speed:.2f}x "
                 f"at γ={gamma}  ({time.perf_counter() - t0:.0f} s)")
    if not path:
        raise ValueError("the search ran out of time before it tried one layer: give it more minutes")
    chosen = max(path, key=lambda r: r["speedup"])
    return {**chosen, "layers": L, "block_influence": [round(b, 5) for b in bi], "path": path,
            "calibration_tokens": len(ids), "seconds": round(time.perf_counter() - t0, 1),
            "head_share": round(h, 4), "objective": "greedy agreement; speedup E/(γc+1+0.04γ)"}


def save_searched(name: str, model: torch.nn.Module, record: dict) -> Path:
    """Write the record atomically (a temporary file renamed into place): a crash leaves the old one."""
    path = cache_path(name, model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"target": name, **record}, indent=1))
    tmp.replace(path)
    return path


def calibration_ids(tokenizer, n_tokens: int) -> list[int]:
    """Calibration text the benchmark never uses: Python standard-library source, files in a fixed order."""
    from verispec.datastore import _read_text, corpus_files

    ids: list[int] = []
    for f in corpus_files("stdlib"):
        if "test" in f.parts:
            continue
        text = _read_text(f)
        if not text:
            continue
        ids += tokenizer(text, add_special_tokens=False)["input_ids"][: n_tokens - len(ids)]
        if len(ids) >= n_tokens:
            break
    if not ids:
        raise ValueError("no calibration text found in the standard library")
    return ids
