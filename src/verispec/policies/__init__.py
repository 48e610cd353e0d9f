"""Draft-length policies: how many tokens to draft next. One file each; each is registered in `verispec.registry`."""

from verispec.policies.adaedl import AdaEDL
from verispec.policies.base import DraftPolicy
from verispec.policies.confidence import Confidence
from verispec.policies.cost import CostAware
from verispec.policies.egag import EGAG
from verispec.policies.fixed import FixedGamma
from verispec.policies.heuristic import Heuristic


def make_policy(name: str, **options) -> DraftPolicy:
    """A policy from its registry name; options it does not take are refused with the list of those it does."""
    from verispec.registry import policy

    rec = policy(name)
    unknown = sorted(set(options) - set(rec.options))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for policy {name!r}; it takes: "
                         f"{', '.join(rec.options)}")
    return rec.load()(**options)


__all__ = ["DraftPolicy", "FixedGamma", "EGAG", "Heuristic", "Confidence", "AdaEDL", "CostAware", "make_policy"]
