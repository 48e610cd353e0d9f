"""Draft-length policies: how many tokens to draft next. One file each; registry: name -> class."""

from verispec.policies.adaedl import AdaEDL
from verispec.policies.base import DraftPolicy
from verispec.policies.confidence import Confidence
from verispec.policies.egag import EGAG
from verispec.policies.fixed import FixedGamma
from verispec.policies.heuristic import Heuristic

POLICIES = {"fixed": FixedGamma, "egag": EGAG, "heuristic": Heuristic, "confidence": Confidence, "adaedl": AdaEDL}


def make_policy(name: str, **options) -> DraftPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    return POLICIES[name](**options)


__all__ = ["DraftPolicy", "FixedGamma", "EGAG", "Heuristic", "Confidence", "AdaEDL", "POLICIES", "make_policy"]
