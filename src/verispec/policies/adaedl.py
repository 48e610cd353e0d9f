"""AdaEDL-style early draft stopping (Agrawal et al. 2024, arXiv 2410.18351, "AdaEDL: Early Draft Stopping for
Speculative Decoding of Large Language Models via an Entropy-based Lower Bound on Token Acceptance Probability").

The acceptance probability of a draft token is 1 − TV(p, q); AdaEDL bounds it from below with a function of the
drafter's entropy alone, β̂ = 1 − sqrt(λ · H(q)), and stops drafting when β̂ falls below a threshold ε. The
threshold adapts to how well drafts are actually doing: ε tracks an exponential moving average of the observed
per-token acceptance rate minus a margin, clamped to [eps_min, eps_max]. (Our reading of the method; λ, the
margin and the EMA factor are options.)
"""

from __future__ import annotations

import math

from verispec.policies.base import DraftPolicy
from verispec.validate import check_int, check_unit
from verispec.policies.entropy import drafter_distribution, entropy


class AdaEDL(DraftPolicy):
    name = "adaedl"

    def __init__(self, gamma_max: int = 8, lam: float = 0.3, eps: float = 0.5, margin: float = 0.1,
                 ema: float = 0.9, eps_min: float = 0.05, eps_max: float = 0.95):
        self.gamma_max = check_int("gamma_max", gamma_max, 1)
        if not isinstance(lam, (int, float)) or lam <= 0:
            raise ValueError(f"lam must be > 0, got {lam!r}")
        self.lam = float(lam)
        self.eps0 = check_unit("eps", eps)
        self.margin = check_unit("margin", margin)
        self.ema = check_unit("ema", ema, hi_open=True)
        self.eps_min, self.eps_max = check_unit("eps_min", eps_min), check_unit("eps_max", eps_max)
        self.sampling = None

    def start(self, sampling, vocab_size):
        self.sampling = sampling
        self.eps = self.eps0
        self.acc_bar: float | None = None
        self._rec: dict = {}

    def next_gamma(self) -> int:
        return self.gamma_max

    def keep_drafting(self, i, q_i, logits_i=None) -> bool:
        p = drafter_distribution(q_i, logits_i, self.sampling, consistent=True)
        if p is None:
            return True
        beta = 1 - math.sqrt(self.lam * entropy(p))
        if i == 0:
            self._rec = {"beta_first": beta, "eps": self.eps}
        return beta >= self.eps

    def update(self, draft, result):
        if not len(draft):
            return
        rate = result.accepted / len(draft)
        self.acc_bar = rate if self.acc_bar is None else self.ema * self.acc_bar + (1 - self.ema) * rate
        self.eps = min(self.eps_max, max(self.eps_min, self.acc_bar - self.margin))

    def record(self) -> dict:
        r, self._rec = self._rec, {}
        return r
