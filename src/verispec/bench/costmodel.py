"""Cost model: what speedup the measured acceptance *should* give, on this machine and on an accelerator.

Leviathan et al. 2023 (Theorem 3.8 and Sec. 3.4): with acceptance rate α and γ drafts per round, a target forward
yields E = (1 − α^(γ+1)) / (1 − α) tokens in expectation; with draft cost c (one draft step / one target step)
and free verification the wall-time gain is E / (γc + 1). Verification is not free on a CPU (a forward of k
tokens costs T(k) > T(1)), so we use the measured ratio T(γ+1)/T(1) in place of 1:

    S(α, γ, c) = (1 − α^(γ+1)) / ((1 − α) · (γ·c + T(γ+1)/T(1)))

That formula assumes i.i.d. acceptance at one rate α̂ and under-predicts: acceptance is position-dependent and
bursty (rounds that got far are the easy ones). Two predictions from the measured rounds themselves sit beside it,
each round r drafting d_r positions over n_r scored nodes (n = d for a chain) and costing d_r·c + T(n_r + 1)/T(1):

- *per-position*: β_i = P(draft i kept | drafts 1..i−1 kept), measured; E(d) = 1 + Σ_{i≤d} Π_{j≤i} β_j; the
  prediction is Σ_r E(d_r) / Σ_r cost_r. It extrapolates to lengths not run, so the cost-aware controller
  (`verispec.policies.cost`) chooses with it.
- *accepted-length*: Σ_r (a_r + 1) / Σ_r cost_r, from the accepted length a_r of every round: the decomposition of
  the measured time into draft and verify costs, without any model of acceptance (it cannot extrapolate).

What none of them includes is the per-round overhead outside drafting and T(k) (sampling, bookkeeping).

The *projection* for a memory-bound accelerator sets T(γ+1)/T(1) = 1 (verifying ≤ 64 tokens costs about one
decode step) and c = drafter parameter bytes / target parameter bytes (a decode step reads every weight once).
It is a projection, not a measurement, and is labelled so everywhere it is printed.
"""

from __future__ import annotations

import math


def expected_tokens(alpha: float, gamma: float) -> float:
    """E[tokens per target forward] with γ drafts at acceptance rate α (≥ 1)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if alpha == 1:
        return gamma + 1
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def verify_ratio(curve: dict[int, float] | None, k: int) -> float:
    """T(k)/T(1) from a measured curve {k: ms}, interpolated linearly (1.0 when no curve: free verification)."""
    if not curve:
        return 1.0
    ks = sorted(curve)
    if k in curve:
        return curve[k] / curve[1]
    if k > ks[-1]:  # beyond the measured range: extrapolate from the last two points
        a, b = ks[-2], ks[-1]
    else:
        a = max(x for x in ks if x < k)
        b = min(x for x in ks if x > k)
    t = curve[a] + (curve[b] - curve[a]) * (k - a) / (b - a)
    return t / curve[1]


def speedup(alpha: float, gamma: float, c: float, curve: dict[int, float] | None = None) -> float:
    if c < 0:
        raise ValueError(f"c must be >= 0, got {c}")
    if gamma == 0:
        return 1.0
    return expected_tokens(alpha, gamma) / (gamma * c + verify_ratio(curve, math.ceil(gamma) + 1))


def optimal_gamma(alpha: float, c: float, curve: dict[int, float] | None = None, gamma_max: int = 16
                  ) -> tuple[int, float]:
    """argmax over γ in 1..gamma_max of S(α, γ, c) -> (γ*, S(γ*))."""
    best = max(range(1, gamma_max + 1), key=lambda g: speedup(alpha, g, c, curve))
    return best, speedup(alpha, best, c, curve)


def conditional_acceptance(d: list[int], a: list[int]) -> list[float | None]:
    """β_i = #(rounds that kept draft i) / #(rounds that drafted i and kept drafts 1..i−1), i = 1..max d."""
    out = []
    for i in range(1, max(d, default=0) + 1):
        tested = sum(1 for di, ai in zip(d, a) if di >= i and ai >= i - 1)
        out.append(sum(1 for ai in a if ai >= i) / tested if tested else None)
    return out


def expected_tokens_by_position(beta: list[float | None], d: int) -> float:
    """E(d) = 1 + Σ_{i≤d} Π_{j≤i} β_j (an untested position counts as never kept)."""
    e, pi = 1.0, 1.0
    for b in beta[:d]:
        pi *= b or 0.0
        e += pi
    return e


def round_costs(d: list[int], n: list[int], c: float, curve: dict[int, float]) -> float:
    """Σ_r d_r·c + T(n_r + 1)/T(1): the rounds' cost in target forwards of one token."""
    return sum(di * c + verify_ratio(curve, ni + 1) for di, ni in zip(d, n))


def predict(method_summary: dict, t1_ms: float | None, curve: dict[int, float] | None,
            size_ratio: float | None, rounds: tuple[list[int], list[int], list[int]] | None = None) -> dict:
    """Predicted (this machine) and projected (accelerator) speedup from a method's measured α̂ and γ, and (with
    `rounds` = (drafted, accepted, nodes scored) per round) the per-position and accepted-length predictions.

    c on this machine is measured in the run: draft seconds per drafted token / target T(1).
    """
    alpha, gamma = method_summary.get("acceptance_rate"), method_summary.get("mean_gamma")
    if alpha is None or not gamma:
        return {"c_measured": None, "predicted": None, "predicted_by_position": None,
                "predicted_from_lengths": None, "projected": None}
    c = None
    if t1_ms and method_summary.get("drafted"):
        c = method_summary["t_draft"] / method_summary["drafted"] / (t1_ms / 1e3)
    by_pos = by_len = None
    if rounds and c is not None and curve and rounds[0]:
        d, a, n = rounds
        cost = round_costs(d, n, c, curve)
        beta = conditional_acceptance(d, a)
        by_pos = sum(expected_tokens_by_position(beta, di) for di in d) / cost
        by_len = (sum(a) + len(a)) / cost
    return {"c_measured": c,
            "predicted": speedup(alpha, gamma, c, curve) if c is not None and curve else None,
            "predicted_by_position": by_pos, "predicted_from_lengths": by_len,
            "projected": speedup(alpha, gamma, size_ratio or 0.0, None)}


def theory_table(alpha: float, c: float, curve: dict[int, float] | None = None, gamma_max: int = 16) -> str:
    g_best, s_best = optimal_gamma(alpha, c, curve, gamma_max)
    lines = [f"α = {alpha:g}, c = {c:g}, verification: " + ("measured T(k)/T(1)" if curve else "free (T(k) = T(1))"),
             "", " γ   E[tokens/forward]   speedup", " --  -----------------   -------"]
    for g in range(1, gamma_max + 1):
        mark = "  <- optimal" if g == g_best else ""
        lines.append(f"{g:3d}   {expected_tokens(alpha, g):17.3f}   {speedup(alpha, g, c, curve):7.3f}{mark}")
    lines += ["", f"optimal γ = {g_best}, expected speedup {s_best:.3f}x"]
    return "\n".join(lines)
