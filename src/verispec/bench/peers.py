"""Benchmark peers: other engines' own generation on the same prompt ids, timed and counted as verispec's methods.

HuggingFace transformers (`hf-ar`, `hf-assisted` with the draft model, `hf-pld` prompt lookup) runs as its users run
it: `model.generate()` on a plain transformers model (loaded once more on the "torch" backend, never on verispec's
converted layers), with transformers' own defaults for its algorithms (e.g. assisted generation's adaptive draft
length unless `gamma=` is given). Two things are pinned so that the comparison is of speed, not of distributions:

- the sampling filters are exactly verispec's: temperature, top-k (0 = off, passed as 0: a missing top_k would
  become transformers' default of 50) and top-p, and nothing else — the model's own generation_config (Qwen's sets
  repetition_penalty, top_k, top_p, temperature) is set aside for the peer's copy, and `check_processors` asks
  transformers which logits processors it would build, so any other filter is an error, not a silent difference;
- tokens are counted the same way: new ids up to and including the first stop token.

`kernels=verispec` (e.g. `hf-assisted:kernels=verispec`) runs HF's algorithm on verispec's converted models instead:
a labelled variant, not what an HF user gets.
"""

from __future__ import annotations

import time

import torch

from verispec.models import LoadedModel
from verispec.sampling import Sampling
from verispec.types import GenerationStats


def generation_config(sampling: Sampling, stop_ids: frozenset[int], max_new_tokens: int, name: str, params: dict):
    """The GenerationConfig a peer runs with: verispec's filters, transformers' defaults for everything else."""
    from transformers import GenerationConfig

    stops = sorted(stop_ids)
    cfg = dict(max_new_tokens=max_new_tokens, eos_token_id=stops or None, pad_token_id=stops[0] if stops else 0,
               do_sample=not sampling.greedy, num_beams=1)
    if not sampling.greedy:
        cfg.update(temperature=float(sampling.temperature), top_k=int(sampling.top_k), top_p=float(sampling.top_p))
    if name == "hf-assisted" and "gamma" in params:  # otherwise HF's own default schedule
        cfg.update(num_assistant_tokens=int(params["gamma"]), num_assistant_tokens_schedule="constant")
    elif name == "hf-pld":
        cfg.update(prompt_lookup_num_tokens=int(params.get("num_tokens", 10)),
                   max_matching_ngram_size=int(params.get("ngram", 2)))
    return GenerationConfig(**cfg)


def expected_processors(sampling: Sampling) -> list[str]:
    """The logits processors that implement verispec's sampling rule in transformers, in HF's order."""
    if sampling.greedy:
        return []
    names = ["TemperatureLogitsWarper"] if sampling.temperature != 1.0 else []
    names += ["TopKLogitsWarper"] if sampling.top_k else []
    return names + (["TopPLogitsWarper"] if sampling.top_p < 1.0 else [])


def check_processors(model: torch.nn.Module, cfg, prompt_len: int, sampling: Sampling) -> list[str]:
    """The processors transformers builds for `cfg` on `model`; raises unless they are exactly verispec's rule."""
    prepared, _ = model._prepare_generation_config(cfg)
    got = [type(p).__name__ for p in model._get_logits_processor(prepared, input_ids_seq_length=prompt_len,
                                                                  device="cpu", model_kwargs={})]
    want = expected_processors(sampling)
    if got != want:
        raise ValueError(f"transformers would sample with {got} where verispec samples with {want}: the peer "
                         f"would not draw from the same distribution")
    return got


def prepare(model: LoadedModel) -> LoadedModel:
    """Set the peer copy's own generation defaults aside (they would add filters verispec does not apply)."""
    from transformers import GenerationConfig

    model.model.generation_config = GenerationConfig()
    return model


@torch.inference_mode()
def run_hf(spec, target: LoadedModel, drafter: LoadedModel | None, prompt_ids: list[int], max_new_tokens: int,
           sampling: Sampling) -> tuple[list[int], GenerationStats]:
    """One generation by transformers' own generate(); `target` / `drafter` are the peer's models."""
    cfg = generation_config(sampling, target.stop_ids, max_new_tokens, spec.name, spec.params)
    kwargs = {"assistant_model": drafter.model} if spec.name == "hf-assisted" else {}
    ids = torch.tensor([prompt_ids])  # (1, T)
    torch.manual_seed(sampling.seed)
    t0 = time.perf_counter()
    out = target.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg, **kwargs)
    t = time.perf_counter() - t0
    new = out[0, len(prompt_ids):].tolist()
    hit = next((i for i, x in enumerate(new) if x in target.stop_ids), None)
    if hit is not None:
        new = new[: hit + 1]
    stats = GenerationStats(method=spec.label, prompt_tokens=len(prompt_ids), new_tokens=len(new), t_total=t,
                            stop_reason="stop_token" if hit is not None else "max_new_tokens")
    return new, stats
