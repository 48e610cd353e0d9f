"""Methods as the benchmark names them: `name` or `name:key=value:key=value` (e.g. `sd:gamma=6`,
`sd:policy=egag:gamma_max=8`, `hf-assisted:gamma=4`).

Every name is a record of `verispec.registry.METHODS`; keys are the method's own options, its policy's options, or
one of the benchmark's: `gamma` (γ, or γ_max for the adaptive policies), `policy`, `verifier` (e.g.
`sd:verifier=block`), and `drafter_backend=B` (run the
method with the drafter loaded on backend B, so drafter backends are compared on the same prompts in the same run;
each backend's drafter is loaded once). Labels are checked here, before any model is loaded.

verispec's own methods run through `verispec.generate`; the peers through their runner (`verispec.bench.peers`),
on the same prompt ids, timed and counted the same way: the new token ids, up to and including the first stop token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import verispec
from verispec.models import LoadedModel
from verispec.registry import METHODS, Method, method, policy, route_options, verifier
from verispec.sampling import Sampling
from verispec.types import GenerationStats
from verispec.validate import parse_value

BENCH_KEYS = ("gamma", "policy", "verifier", "drafter_backend")  # the benchmark's and generate()'s own keys


@dataclass(frozen=True)
class MethodSpec:
    label: str
    name: str
    params: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def record(self) -> Method:
        return METHODS[self.name]

    @property
    def needs_drafter(self) -> bool:
        return self.record.needs_draft_model

    @property
    def peer(self) -> bool:
        return self.record.kind == "peer"

    @property
    def on_our_kernels(self) -> bool:
        """A peer asked to run on verispec's converted models (`kernels=verispec`), not as its users run it."""
        return self.peer and self.params.get("kernels") == "verispec"

    def drafter_backend(self, default: str) -> str:
        return str(self.params.get("drafter_backend", default))


def _check_params(m: Method, params: dict, label: str) -> None:
    if m.kind == "peer":
        unknown = sorted(set(params) - set(m.options) - ({"drafter_backend"} if m.needs_draft_model else set()))
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(unknown)} in {label!r}; {m.name} takes: "
                             f"{', '.join(m.options)}")
        if params.get("kernels", "verispec") != "verispec":
            raise ValueError(f"{label!r}: kernels= takes only 'verispec' (HF's algorithm on verispec's models)")
        return
    if m.kind == "baseline" and "policy" in params:
        raise ValueError(f"{label!r}: {m.name} drafts nothing and takes no policy")
    p = None if m.kind == "baseline" else policy(str(params.get("policy", "fixed")))
    if "verifier" in params:
        if m.kind == "baseline":
            raise ValueError(f"{label!r}: {m.name} verifies nothing and takes no verifier")
        verifier(str(params["verifier"]))
    route_options(m, p, {k: v for k, v in params.items() if k not in BENCH_KEYS})


def parse_methods(text: str) -> list[MethodSpec]:
    specs = []
    for label in [m.strip() for m in text.split(",") if m.strip()]:
        name, *kvs = label.split(":")
        m = method(name)
        params = {}
        for kv in kvs:
            if "=" not in kv:
                raise ValueError(f"method parameter {kv!r} in {label!r} must look like key=value")
            k, v = kv.split("=", 1)
            params[k] = parse_value(v)
        _check_params(m, params, label)
        specs.append(MethodSpec(label, name, params))
    if len({s.label for s in specs}) != len(specs):
        raise ValueError("a method is listed twice")
    return specs


def run_method(spec: MethodSpec, target: LoadedModel, drafter: LoadedModel | None, prompt_ids: list[int],
               max_new_tokens: int, sampling: Sampling, gamma: int) -> tuple[list[int], GenerationStats]:
    """`target` / `drafter` are the models this method runs on (a peer's are its own plain copies)."""
    if spec.peer:
        return spec.record.load()(spec, target, drafter, prompt_ids, max_new_tokens, sampling)
    params = dict(spec.params)
    params.pop("drafter_backend", None)  # chosen by the caller when it picked `drafter`
    out = verispec.generate(target, prompt_ids, drafter=drafter if spec.needs_drafter else None, method=spec.name,
                            gamma=params.pop("gamma", gamma), sampling=sampling, max_new_tokens=max_new_tokens,
                            **params)
    return out.token_ids, out.stats
