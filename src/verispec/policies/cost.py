"""A cost-aware draft controller: each round, draft the length that maximises expected tokens per second.

Leviathan et al. 2023 (Sec. 3.4) choose γ to maximise the expected speedup from α and the cost ratio c, under an
i.i.d. acceptance assumption and free verification. Neither holds here: acceptance is position-dependent and bursty,
and on a CPU a k-token verify costs T(k) > T(1). This controller keeps both measured:

- **cost** of a round that drafts d positions and has the target score n nodes (n = d for a chain):
      C(d) = o + d · t_d + T(n + 1),   T(k) = T_1 + s · (k − 1)
  t_d (drafting seconds per drafted position), o (the round's other seconds) and the line T(k) are fitted online
  from the engine's per-round timings (`observe_costs`), with exponentially decayed weights; before the first round
  they come from priors (c = t_d / T_1, slope s / T_1). A measured curve can be given instead (`verify_cost="1:314,
  8:409,16:524"`, ms, and `draft_cost=c` as a fraction of T(1)): then nothing is timed and the choices are a
  deterministic function of the acceptance history (reproducible with a seed).
- **acceptance** per position, estimate="position": β_i = P(draft i kept | drafts 1..i−1 kept), from decayed counts
  of rounds that tested position i, shrunk towards β_{i−1} (a Beta prior of weight `prior_weight`, β_0 = `alpha`).
  Conditioning on the earlier positions is what makes bursty acceptance predictable: rounds that got far are the
  easy ones, so β_i rises with i where α̂ by position falls.
  The expected tokens of a round that drafts d positions are E(d) = 1 + Σ_{i≤d} Π_{j≤i} β_j, and the round drafts
      d* = argmax_{1 ≤ d ≤ gamma_max} E(d) / C(d).
- estimate="entropy" (chains only; a calibrated EGAG): the seed's EGAG maps H / log V to γ, which with a
  151,936-token vocabulary is nearly constant. Here the drafter's entropy H (nats, of the distribution it sampled
  from; at T = 1 for greedy) is mapped to acceptance by a fit updated online: decayed acceptance counts in
  fixed H bins, each shrunk towards the position estimate β_i. Drafting continues after token i while some
  longer round beats stopping now, with the tokens not yet drafted valued at their position estimates:
      continue iff max_{m ≥ 1} E_{i+m} / C(i+m) > E_i / C(i),   E_i = 1 + Σ_{j≤i} Π_{l≤j} β̂_l.

The choice for a round uses only rounds already verified (and, in entropy mode, the drafter's own distributions in
this round): the output distribution stays exactly the target's. Trees (`sd-tree`): d is the depth, n the node
count observed at each depth.
"""

from __future__ import annotations

import math

from verispec.policies.base import DraftPolicy
from verispec.policies.entropy import drafter_distribution, entropy
from verispec.validate import check_int, check_unit

ESTIMATES = ("position", "entropy")
H_EDGES = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)  # nats: bin b holds H in [edge_{b−1}, edge_b)


def parse_curve(s) -> dict[int, float]:
    """'1:314,8:409' -> {1: 314.0, 8: 409.0} (ms); k = 1 must be there."""
    try:
        curve = {int(k): float(v) for k, v in (p.split(":") for p in str(s).split(","))}
    except ValueError:
        curve = {}
    if 1 not in curve or any(k < 1 or v <= 0 for k, v in curve.items()):
        raise ValueError(f"verify_cost must be k:ms pairs with k = 1 among them, e.g. '1:314,8:409'; got {s!r}")
    return curve


class Decayed:
    """Exponentially decayed weighted sums (recent rounds count more: costs and acceptance drift)."""

    def __init__(self, decay: float, n: int):
        self.decay, self.s = decay, [0.0] * n

    def add(self, *xs: float) -> None:
        self.s = [self.decay * a + x for a, x in zip(self.s, xs)]


class CostAware(DraftPolicy):
    name = "cost"

    def __init__(self, gamma_max: int = 8, estimate: str = "position", alpha: float = 0.6,
                 prior_weight: float = 2.0, decay: float = 0.97, c: float = 0.1, slope: float = 0.04,
                 verify_cost=None, draft_cost=None):
        self.gamma_max = check_int("gamma_max", gamma_max, 1)
        if estimate not in ESTIMATES:
            raise ValueError(f"estimate must be one of {', '.join(ESTIMATES)}; got {estimate!r}")
        self.estimate = estimate
        self.alpha = check_unit("alpha", alpha, lo_open=True, hi_open=True)
        if not isinstance(prior_weight, (int, float)) or prior_weight <= 0:
            raise ValueError(f"prior_weight must be > 0, got {prior_weight!r}")
        self.w = float(prior_weight)
        self.decay = check_unit("decay", decay, lo_open=True)
        self.c0, self.slope0 = check_unit("c", c), check_unit("slope", slope)
        self.curve = parse_curve(verify_cost) if verify_cost is not None else None
        self.fixed_c = None if draft_cost is None else check_unit("draft_cost", draft_cost)
        self.sampling = None
        # learned state persists across generations of one policy object; start() resets only the round's state
        self.pos = Decayed(self.decay, 2 * self.gamma_max)  # [tested_1, kept_1, tested_2, kept_2, ...]
        self.bins = Decayed(self.decay, 2 * (len(H_EDGES) + 1))
        self.times = Decayed(self.decay, 7)  # Σ1, Σn, Σn², Σt_verify, Σn·t_verify, Σt_draft, Σd
        self.other = Decayed(self.decay, 2)  # Σ t_other, rounds
        self.nodes_at = {}  # depth -> decayed (Σ nodes, rounds): what a tree of that depth costs to score

    def start(self, sampling, vocab_size):
        self.sampling = sampling
        self._h: list[float] = []
        self._rec: dict = {}

    # -- estimates -------------------------------------------------------------------------------------------

    def beta(self) -> list[float]:
        """β_1 .. β_gamma_max: P(draft i kept | drafts before it kept)."""
        out, prev = [], self.alpha
        for i in range(self.gamma_max):
            n, k = self.pos.s[2 * i], self.pos.s[2 * i + 1]
            prev = (k + self.w * prev) / (n + self.w)
            out.append(prev)
        return out

    def beta_h(self, h: float, prior: float) -> float:
        b = next((j for j, e in enumerate(H_EDGES) if h < e), len(H_EDGES))
        n, k = self.bins.s[2 * b], self.bins.s[2 * b + 1]
        return (k + self.w * prior) / (n + self.w)

    def t_verify(self, n: int) -> float:
        """T(n + 1) in seconds (or in units of T(1) before anything was timed)."""
        k = n + 1
        if self.curve is not None:  # linear between measured points, extended past the last two
            ks = sorted(self.curve)
            if k in self.curve or len(ks) == 1:
                return self.curve.get(k, self.curve[ks[-1]]) / 1e3
            a, b = (ks[-2], ks[-1]) if k > ks[-1] else (max(x for x in ks if x < k), min(x for x in ks if x > k))
            return (self.curve[a] + (self.curve[b] - self.curve[a]) * (k - a) / (b - a)) / 1e3
        W, Sn, Snn, St, Snt = self.times.s[:5]
        if W == 0:
            return 1.0 + self.slope0 * n
        # least squares t = a + b·n with a prior pulling b towards slope0·a (weight w rounds at n = 0 and n = 16)
        mean_t = St / W
        a0 = mean_t / (1 + self.slope0 * Sn / W)
        pw = self.w
        W2, Sn2, Snn2 = W + 2 * pw, Sn + pw * 16, Snn + pw * 256
        St2, Snt2 = St + pw * a0 + pw * a0 * (1 + 16 * self.slope0), Snt + pw * 16 * a0 * (1 + 16 * self.slope0)
        det = W2 * Snn2 - Sn2 * Sn2
        b = max(0.0, (W2 * Snt2 - Sn2 * St2) / det) if det > 0 else self.slope0 * a0
        a = (St2 - b * Sn2) / W2
        return max(a, 1e-9) + b * n

    def t_draft(self) -> float:
        """Seconds per drafted position (or units of T(1) before anything was timed)."""
        if self.fixed_c is not None:
            return self.fixed_c * self.t_verify(0)
        T, D = self.times.s[5], self.times.s[6]
        return T / D if D > 0 else self.c0 * self.t_verify(0)

    def t_other(self) -> float:
        T, n = self.other.s
        return T / n if n > 0 and self.curve is None else 0.0

    def nodes(self, d: int) -> float:
        s = self.nodes_at.get(d)
        return s.s[0] / s.s[1] if s is not None and s.s[1] > 0 else d

    def cost(self, d: int) -> float:
        return self.t_other() + d * self.t_draft() + self.t_verify(round(self.nodes(d)))

    def best_length(self, start: int, e: float, pi: float, beta: list[float]) -> tuple[int, float]:
        """(d, rate) maximising E(d) / C(d) over d in start..gamma_max, given E(start) = e and Π β so far = pi."""
        best, rate = start, e / self.cost(start) if start else 1.0 / self.cost(0)
        for d in range(start + 1, self.gamma_max + 1):
            pi *= beta[d - 1]
            e += pi
            r = e / self.cost(d)
            if r > rate:
                best, rate = d, r
        return best, rate

    # -- the policy interface ----------------------------------------------------------------------------------

    def next_gamma(self) -> int:
        beta = self.beta()
        if self.estimate == "entropy":
            self._h, self._pi, self._e = [], 1.0, 1.0
            self._rec = {"beta_1": beta[0]}
            return self.gamma_max  # the stop is decided token by token from the drafter's entropy
        d, rate = self.best_length(0, 1.0, 1.0, beta)
        d = max(1, d)
        self._rec = {"gamma": d, "beta_1": beta[0], "expected_rate": rate}
        return d

    def keep_drafting(self, i, q_i, logits_i=None) -> bool:
        if self.estimate != "entropy":
            return True
        p = drafter_distribution(q_i, logits_i, self.sampling, consistent=True)
        beta = self.beta()
        if p is None:
            b = beta[i]
        else:
            h = entropy(p)
            self._h.append(h)
            b = self.beta_h(h, beta[i])
        self._pi *= b
        self._e += self._pi
        n = i + 1
        if n >= self.gamma_max:
            return False
        stop_rate = self._e / self.cost(n)
        d, rate = self.best_length(n, self._e, self._pi, beta)
        self._rec = {"gamma": n, "beta_1": beta[0]}
        return d > n and rate > stop_rate

    def update(self, draft, result):
        d = len(draft)
        if d == 0:
            return
        tested = min(d, result.accepted + 1)  # positions 1 .. accepted kept, the next one (if drafted) rejected
        counts = [0.0] * (2 * self.gamma_max)
        for i in range(min(tested, self.gamma_max)):
            counts[2 * i] = 1.0
            counts[2 * i + 1] = 1.0 if i < result.accepted else 0.0
        self.pos.add(*counts)
        if self.estimate == "entropy" and self._h:
            bins = [0.0] * len(self.bins.s)
            for i, h in enumerate(self._h[:tested]):
                b = next((j for j, e in enumerate(H_EDGES) if h < e), len(H_EDGES))
                bins[2 * b] += 1.0
                bins[2 * b + 1] += 1.0 if i < result.accepted else 0.0
            self.bins.add(*bins)

    def observe_costs(self, draft, t_draft, t_verify, t_other):
        d, n = len(draft), len(draft.tokens)
        if self.curve is None:
            self.times.add(1.0, n, n * n, t_verify, n * t_verify, t_draft if d else 0.0, d)
            self.other.add(t_other, 1.0)
        if draft.parents is not None and d:
            self.nodes_at.setdefault(d, Decayed(self.decay, 2)).add(n, 1.0)

    def record(self) -> dict:
        r, self._rec = self._rec, {}
        return r
