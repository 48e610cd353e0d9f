"""Benchmark arithmetic on per-generation rows.

A row is one generation (prompt x method x repeat) as stored in prompts.jsonl. Its step log holds, per target
forward, the number of drafts `d`, accepted drafts `a` and the kind of the added token `k` ("r" recovered, "b"
bonus). The speculative metrics (α̂, MAT, γ used, acceptance by position) come from `verispec.metrics.speculative`
over all rounds of a method's rows, exactly as for one generation. Speedup = Σ AR wall time / Σ method wall time
over the same (prompt, repeat) pairs.
"""

from __future__ import annotations

import statistics

import numpy as np

from verispec.metrics import speculative
from verispec.types import GenerationStats


def steps_log(stats: GenerationStats) -> dict:
    return {"d": [s.drafted for s in stats.steps], "a": [s.accepted for s in stats.steps],
            "n": [s.nodes for s in stats.steps],
            "k": "".join("r" if s.kind == "recovered" else "b" for s in stats.steps),
            "src": [s.source for s in stats.steps] if any(s.source for s in stats.steps) else None,
            "extra": [s.extra for s in stats.steps] if any(s.extra for s in stats.steps) else None}


def _pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def aggregate(rows: list[dict], ar_rows: list[dict], params: dict[str, int] | None = None) -> dict:
    """Summary of one method's rows against the AR rows of the same (prompt, repeat) pairs."""
    params = params or {}
    ar = {(r["prompt_id"], r["repeat"]): r for r in ar_rows}
    pairs = [(r, ar[(r["prompt_id"], r["repeat"])]) for r in rows if (r["prompt_id"], r["repeat"]) in ar]
    wall = sum(r["t_total"] for r, _ in pairs)
    ar_wall = sum(a["t_total"] for _, a in pairs)
    tokens = sum(r["new_tokens"] for r, _ in pairs)
    by_repeat: dict[int, list[float]] = {}
    for r, a in pairs:
        t = by_repeat.setdefault(r["repeat"], [0.0, 0.0])
        t[0] += a["t_total"]
        t[1] += r["t_total"]
    if len(by_repeat) > 1:  # spread over repeats of the whole prompt set
        spread_of, spread = "repeats", [a / m for a, m in by_repeat.values() if m]
    else:  # one repeat: spread over prompts
        spread_of, spread = "prompts", [a["t_total"] / r["t_total"] for r, a in pairs if r["t_total"]]
    logged = [r for r, _ in pairs if r.get("steps")]
    d = [x for r in logged for x in r["steps"]["d"]]
    a = [x for r in logged for x in r["steps"]["a"]]
    flops = None
    if params.get("target"):
        flops = 2 * params["target"] * sum(r["target_tokens_processed"] for r, _ in pairs)
        if params.get("drafter"):
            flops += 2 * params["drafter"] * sum(r.get("drafter_tokens_processed", 0) for r, _ in pairs)
    per_prompt = [r["t_total"] for r, _ in pairs]
    per_token = [r["t_total"] / r["new_tokens"] for r, _ in pairs if r["new_tokens"]]
    em = [r["exact_match_ar"] for r, _ in pairs if r.get("exact_match_ar") is not None]
    ll = [r["loglik"] for r, _ in pairs if r.get("loglik") is not None]
    bleu = [r["bleu"] for r, _ in pairs if r.get("bleu") is not None]
    return {
        "generations": len(pairs), "new_tokens": tokens, "wall_s": wall,
        "tokens_per_s": tokens / wall if wall else None,
        "speedup": ar_wall / wall if wall else None,
        "speedup_spread": {"of": spread_of, "min": min(spread, default=None),
                           "median": statistics.median(spread) if spread else None, "max": max(spread, default=None),
                           "std": statistics.pstdev(spread) if len(spread) > 1 else 0.0},
        **speculative(d, a),
        "steps": len(d) if logged else None,
        "target_forwards": sum(r.get("target_forwards") or 0 for r, _ in pairs) if logged else None,
        "drafter_forwards": sum(r.get("drafter_forwards") or 0 for r, _ in pairs) if logged else None,
        "flops": flops,
        "t_prefill": sum(r.get("t_prefill") or 0 for r, _ in pairs),
        "t_draft": sum(r.get("t_draft") or 0 for r, _ in pairs),
        "t_verify": sum(r.get("t_verify") or 0 for r, _ in pairs),
        "t_other": sum(r.get("t_other") or 0 for r, _ in pairs),
        "latency_s": {"p50": _pct(per_prompt, 50), "p90": _pct(per_prompt, 90), "p99": _pct(per_prompt, 99)},
        "latency_per_token_ms": {"p50": _pct([x * 1e3 for x in per_token], 50),
                                 "p90": _pct([x * 1e3 for x in per_token], 90)},
        "exact_match_ar": sum(em) / len(em) if em else None,
        "mismatched_prompts": sorted({r["prompt_id"] for r, _ in pairs if r.get("exact_match_ar") is False}),
        "mean_loglik": sum(ll) / len(ll) if ll else None,
        "bleu": sum(bleu) / len(bleu) if bleu else None,
    }
