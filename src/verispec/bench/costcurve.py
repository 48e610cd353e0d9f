"""Measure what the cost model needs on this machine: the target's T(k) for k = 1..16 on a warm cache, the
drafter's T(1), both models' parameter counts (for FLOPs and the accelerator projection), and the target backend's
batch invariance (what greedy equality with AR rests on)."""

from __future__ import annotations

from verispec.models import LoadedModel

KS = tuple(range(1, 17))


def measure_costs(target: LoadedModel, drafter: LoadedModel | None, curve: bool = True) -> dict:
    out = {"target_params": target.num_parameters, "drafter_params": drafter.num_parameters if drafter else None}
    out["size_ratio"] = out["drafter_params"] / out["target_params"] if drafter else None
    if curve:
        from verispec.bench.measure import forward_cost_curve

        curve = forward_cost_curve(target.model, ks=KS, repeats=3, warmup=1)
        out["target_curve_ms"] = {str(k): v for k, v in curve.items()}
        out["invariance"] = invariance(target)
        if drafter is not None:
            out["drafter_curve_ms"] = drafter_curve(drafter)
    return out


def invariance(target: LoadedModel) -> dict:
    """How far the target's logits at a position move between AR and the chain / tree forwards verification runs
    (`verispec.bench.invariance`): what greedy equality with AR rests on, on this backend."""
    from verispec.bench.invariance import batch_invariance

    r = batch_invariance(target.model, ks=(1, 2, 4, 8, 16), trees=((2, 2, 2),))
    return {**r["overall"], "chain_max_abs_by_k": {k: c["max_abs"] for k, c in r["chains"].items()}}


def drafter_curve(drafter: LoadedModel) -> dict[str, float]:
    """The drafter's T(1) and T(2) in ms on a warm cache (what c = T_draft(1) / T(1) needs), timing the forward
    drafting runs (the lean one where the model family is known, `verispec.rewrites.lean`)."""
    from verispec.bench.measure import forward_cost_curve

    d = forward_cost_curve(drafter.model, ks=(1, 2), repeats=5, warmup=1, lean=True)
    return {str(k): v for k, v in d.items()}
