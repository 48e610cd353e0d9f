"""Methods as the benchmark names them: `name` or `name:key=value:key=value` (e.g. `sd:gamma=6`).

`drafter_backend=B` (e.g. `sd:drafter_backend=fast-int8`) runs that method with the drafter loaded on backend B, so
drafter backends are compared on the same prompts in the same run (each backend's drafter is loaded once).

verispec's own methods run through `verispec.generate`; HuggingFace's own generation runs as peers on the same
prompt ids (`hf-ar`, `hf-assisted` with the draft model, `hf-pld` prompt lookup), timed the same way and counted
the same way: the new token ids, up to and including the first stop token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

import verispec
from verispec.drafters import DRAFTERS
from verispec.models import LoadedModel
from verispec.sampling import Sampling
from verispec.types import GenerationStats

HF_PEERS = ("hf-ar", "hf-assisted", "hf-pld")


@dataclass(frozen=True)
class MethodSpec:
    label: str
    name: str
    params: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def needs_drafter(self) -> bool:
        if self.name in HF_PEERS:
            return self.name == "hf-assisted"
        return self.name in DRAFTERS and DRAFTERS[self.name][1]

    @property
    def peer(self) -> bool:
        return self.name in HF_PEERS

    def drafter_backend(self, default: str) -> str:
        return str(self.params.get("drafter_backend", default))


def _value(v: str):
    """'3' -> 3, '0.5' -> 0.5, 'true'/'false' -> bool, anything else stays a string."""
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def parse_methods(text: str) -> list[MethodSpec]:
    specs = []
    for label in [m.strip() for m in text.split(",") if m.strip()]:
        name, *kvs = label.split(":")
        if name not in verispec.METHODS and name not in HF_PEERS:
            raise ValueError(f"unknown method {name!r}; known: {', '.join((*verispec.METHODS, *HF_PEERS))}")
        params = {}
        for kv in kvs:
            if "=" not in kv:
                raise ValueError(f"method parameter {kv!r} in {label!r} must look like key=value")
            k, v = kv.split("=", 1)
            params[k] = _value(v)
        specs.append(MethodSpec(label, name, params))
    if len({s.label for s in specs}) != len(specs):
        raise ValueError("a method is listed twice")
    return specs


def run_method(spec: MethodSpec, target: LoadedModel, drafter: LoadedModel | None, prompt_ids: list[int],
               max_new_tokens: int, sampling: Sampling, gamma: int) -> tuple[list[int], GenerationStats]:
    """`drafter` is the drafter for this method (already on the backend `spec` asks for)."""
    if spec.peer:
        return run_hf(spec, target, drafter, prompt_ids, max_new_tokens, sampling)
    params = dict(spec.params)
    params.pop("drafter_backend", None)  # chosen by the caller when it picked `drafter`
    out = verispec.generate(target, prompt_ids, drafter=drafter if spec.needs_drafter else None, method=spec.name,
                            gamma=params.pop("gamma", gamma), sampling=sampling, max_new_tokens=max_new_tokens,
                            **params)
    return out.token_ids, out.stats


@torch.inference_mode()
def run_hf(spec: MethodSpec, target: LoadedModel, drafter: LoadedModel | None, prompt_ids: list[int],
           max_new_tokens: int, sampling: Sampling) -> tuple[list[int], GenerationStats]:
    from transformers import GenerationConfig

    stops = sorted(target.stop_ids)
    cfg = dict(max_new_tokens=max_new_tokens, eos_token_id=stops or None, pad_token_id=stops[0] if stops else 0,
               do_sample=not sampling.greedy)
    if not sampling.greedy:
        cfg.update(temperature=sampling.temperature, top_k=sampling.top_k or None, top_p=sampling.top_p)
    kwargs = {}
    if spec.name == "hf-assisted":
        kwargs["assistant_model"] = drafter.model
        if "gamma" in spec.params:  # otherwise HF's own defaults (its adaptive schedule)
            cfg.update(num_assistant_tokens=spec.params["gamma"], num_assistant_tokens_schedule="constant")
    elif spec.name == "hf-pld":
        cfg.update(prompt_lookup_num_tokens=spec.params.get("num_tokens", 10),
                   max_matching_ngram_size=spec.params.get("ngram", 2))
    ids = torch.tensor([prompt_ids])  # (1, T)
    torch.manual_seed(sampling.seed)
    t0 = time.perf_counter()
    out = target.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=GenerationConfig(**cfg),
                                **kwargs)
    t = time.perf_counter() - t0
    new = out[0, len(prompt_ids):].tolist()
    hit = next((i for i, x in enumerate(new) if x in target.stop_ids), None)
    if hit is not None:
        new = new[: hit + 1]
    stats = GenerationStats(method=spec.label, prompt_tokens=len(prompt_ids), new_tokens=len(new), t_total=t,
                            stop_reason="stop_token" if hit is not None else "max_new_tokens")
    return new, stats
