"""The Python API: `verispec.generate(target, prompt, drafter=..., gamma=..., sampling=...)`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from verispec.backends import check_target, drafter_backend as default_for_drafter
from verispec.cache import CachedLM
from verispec.engine import decode
from verispec.models.load import LoadedModel, check_compatible, load_model
from verispec.policies.base import DraftPolicy
from verispec.registry import Method, method as method_record, policy as policy_record, route_options
from verispec.registry import verifier as verifier_record
from verispec.sampling import Sampling
from verispec.types import GenerationStats


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


def resolve_policy(m: Method, policy, gamma: int, options: dict) -> tuple[DraftPolicy | None, dict]:
    """(the draft-length policy, the method's own options). `policy` is a DraftPolicy, a registry name or None
    ("fixed"); `gamma` seeds the policy's γ or γ_max unless an option sets it. Options are routed by the registry's
    lists; a baseline (beam) drafts nothing and takes no policy."""
    if m.kind == "baseline":
        if policy not in (None, "fixed"):
            raise ValueError(f"method {m.name!r} drafts nothing: it takes no draft-length policy")
        return None, route_options(m, None, options)[0]
    if isinstance(policy, DraftPolicy):
        return policy, route_options(m, None, options)[0]
    rec = policy_record(policy or "fixed")
    mine, theirs = route_options(m, rec, options)
    theirs.setdefault(rec.gamma_option, gamma)
    return rec.load()(**theirs), mine


def check_pair(methods, target: LoadedModel, drafter: LoadedModel) -> None:
    """Refuse a drafter that one of `methods` (the records that will use it) cannot use: a method that drafts
    through text (`any_tokenizer`, e.g. uag) needs both tokenizers; every other one the same vocabulary."""
    if any(m.any_tokenizer for m in methods):
        from verispec.drafters.cross_tokenizer import check_tokenizers

        check_tokenizers(target, drafter)
    if any(not m.any_tokenizer for m in methods):
        check_compatible(target, drafter)


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

    method: a name from `verispec.registry.METHODS` ("ar", "sd", "nasd", "pld", "nasd+sd", "rest", "lookahead",
    "beam"); default "sd" when a drafter model is given, else "ar". sampling: Sampling(temperature=0) is greedy.
    policy: a DraftPolicy or a policy name from `verispec.registry.POLICIES`; extra keyword options go to the
    method or the policy by the options each record lists (an option neither takes is an error).
    verifier: a verifier object or a name from `verispec.registry.VERIFIERS` ("rejection", the default, or
    "block", "traversal"); rejection and block send token trees to the multi-step tree rule, traversal verifies
    them leaf to root.
    backend / drafter_backend: how models that verispec loads by name run (see verispec.load_model). The target's
    backend must be one that can serve a target (`verispec.backends`: not the lossy drafter backends).
    """
    sampling = sampling or Sampling()
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    m = method_record(method or ("sd" if drafter is not None else "ar"))
    if m.kind == "peer":
        raise ValueError(f"method {m.name!r} is a benchmark peer (another engine's own generation): run it with "
                         f"`verispec bench --methods {m.name}`")
    policy, options = resolve_policy(m, policy, gamma, options)
    if m.kind == "baseline" and verifier is not None:
        raise ValueError(f"method {m.name!r} verifies nothing: it takes no verifier")
    if verifier is None or isinstance(verifier, str):
        verifier = verifier_record(verifier or "rejection").load()()
    check_target(backend)
    target = load_model(target, backend=backend)
    check_target(target.backend)  # a model object passed in may already be on a drafter-only backend
    prompt_ids = encode_prompt(target, prompt)
    _check_length(target, len(prompt_ids), max_new_tokens)
    generator = torch.Generator().manual_seed(sampling.seed)

    draft_model = None
    if m.kind == "baseline":
        extra = {"sampling": sampling} if m.loaded_model else {}  # sot-lossy: needs the tokenizer, may sample
        ids, stats = m.load()(target if m.loaded_model else target.model, prompt_ids, max_new_tokens=max_new_tokens,
                              stop_ids=target.stop_ids, **extra, **options)
    else:
        if m.needs_draft_model:
            if drafter is None:
                raise ValueError(f"method {m.name!r} needs a drafter model (drafter=...)")
            # "auto-draft" unless one is named; a model object passed in is converted only as a copy
            draft_model = load_model(drafter, backend=default_for_drafter(backend, drafter_backend))
            check_pair([m], target, draft_model)
        d = m.load()(_Ctx(target, draft_model, target.stop_ids, options))
        # a lossy verifier (typical-lossy) is named in the method's label, so every report says it
        label = m.name if getattr(verifier, "lossless", True) else f"{m.name}+{verifier.name}"
        ids, stats = decode(CachedLM(target.model), d, verifier, policy, prompt_ids,
                            max_new_tokens=max_new_tokens, sampling=sampling, stop_ids=target.stop_ids,
                            method=label, generator=generator)
    text = target.tokenizer.decode(ids, skip_special_tokens=True) if target.tokenizer is not None else None
    return GenerationOutput(text, ids, prompt_ids, stats,
                            (target.backend, draft_model.backend if draft_model is not None else None))
