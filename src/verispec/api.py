"""The Python API: `verispec.generate(target, prompt, drafter=..., gamma=..., sampling=...)`."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from verispec.cache import CachedLM
from verispec.drafters import DRAFTERS
from verispec.engine import decode
from verispec.models.load import LoadedModel, check_compatible, load_model
from verispec.policies import POLICIES
from verispec.policies.base import DraftPolicy
from verispec.sampling import Sampling
from verispec.types import GenerationStats
from verispec.verifiers import RejectionVerifier

METHODS = (*DRAFTERS, "beam")


@dataclass
class GenerationOutput:
    text: str | None
    token_ids: list[int]
    prompt_ids: list[int]
    stats: GenerationStats
    backends: tuple[str, str | None] = ("torch", None)  # (target, drafter)


@dataclass
class _Ctx:
    """What a drafter factory may use to build its drafter."""

    target: LoadedModel
    drafter: LoadedModel | None
    stop_ids: frozenset[int]
    options: dict


def resolve_policy(policy, gamma: int, options: dict) -> tuple[DraftPolicy, dict]:
    """A policy object, or a registry name built from the options its constructor accepts (`gamma` seeds γ or
    γ_max); the remaining options go to the drafter."""
    if isinstance(policy, DraftPolicy):
        return policy, options
    cls = POLICIES.get(policy or "fixed")
    if cls is None:
        raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    mine = {k: v for k, v in options.items() if k in accepted}
    if "gamma" in accepted:
        mine.setdefault("gamma", gamma)
    elif "gamma_max" in accepted:
        mine.setdefault("gamma_max", gamma)
    return cls(**mine), {k: v for k, v in options.items() if k not in accepted}


def encode_prompt(target: LoadedModel, prompt, max_positions: int | None = None) -> list[int]:
    if isinstance(prompt, str):
        if target.tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer; pass token ids or a model with a tokenizer")
        ids = target.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    elif isinstance(prompt, torch.Tensor):
        ids = prompt.reshape(-1).tolist()
    else:
        ids = [int(i) for i in prompt]
    if not ids:
        raise ValueError("the prompt is empty: give at least one token of text")
    if any(i < 0 or i >= target.vocab_size for i in ids):
        raise ValueError(f"prompt token ids must be in [0, {target.vocab_size})")
    return ids


def _check_length(target: LoadedModel, n_prompt: int, max_new_tokens: int) -> None:
    limit = getattr(target.model.config, "max_position_embeddings", None)
    if limit is not None and n_prompt + max_new_tokens > limit:
        raise ValueError(f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"context of {limit} positions")


def generate(target, prompt, *, drafter=None, method: str | None = None, gamma: int = 4,
             sampling: Sampling | None = None, max_new_tokens: int = 128, policy: DraftPolicy | str | None = None,
             verifier=None, backend: str = "auto", drafter_backend: str | None = None,
             **options) -> GenerationOutput:
    """Generate a continuation of `prompt` (text or token ids) with the target's exact distribution.

    method: "ar" (autoregressive), "sd" (draft-model speculative sampling), "beam", or any registered drafter
    name; default "sd" when a drafter model is given, else "ar". sampling: Sampling(temperature=0) is greedy.
    policy: a DraftPolicy or a registry name ("fixed", "egag", "heuristic", "confidence", "adaedl"); extra keyword
    options go to the policy when its constructor takes them, else to the drafter.
    backend / drafter_backend: how models that verispec loads by name run (see verispec.load_model).
    """
    sampling = sampling or Sampling()
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    method = method or ("sd" if drafter is not None else "ar")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    if method == "beam":
        policy = None  # beam search drafts nothing; its options (num_beams, length_penalty) go to it
    else:
        policy, options = resolve_policy(policy, gamma, options)
    target = load_model(target, backend=backend)
    prompt_ids = encode_prompt(target, prompt)
    _check_length(target, len(prompt_ids), max_new_tokens)
    generator = torch.Generator().manual_seed(sampling.seed)

    draft_model = None
    if method == "beam":
        from verispec.beam import beam_search

        ids, stats = beam_search(target.model, prompt_ids, max_new_tokens=max_new_tokens, stop_ids=target.stop_ids,
                                 **options)
    else:
        factory, needs_model = DRAFTERS[method]
        if needs_model:
            if drafter is None:
                raise ValueError(f"method {method!r} needs a drafter model (drafter=...)")
            from verispec.backends import drafter_backend as default_for_drafter

            # "auto-draft" unless one is named; load_model leaves a model object passed in as it is
            draft_model = load_model(drafter, backend=default_for_drafter(backend, drafter_backend))
            check_compatible(target, draft_model)
        d = factory(_Ctx(target, draft_model, target.stop_ids, options))
        ids, stats = decode(CachedLM(target.model), d, verifier or RejectionVerifier(), policy, prompt_ids,
                            max_new_tokens=max_new_tokens, sampling=sampling, stop_ids=target.stop_ids,
                            method=method, generator=generator)
    text = target.tokenizer.decode(ids, skip_special_tokens=True) if target.tokenizer is not None else None
    return GenerationOutput(text, ids, prompt_ids, stats,
                            (target.backend, draft_model.backend if method != "beam" and draft_model else None))
