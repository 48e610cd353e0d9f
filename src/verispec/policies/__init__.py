"""Draft-length policies: how many tokens to draft next. Registry: name -> class."""

from verispec.policies.base import DraftPolicy
from verispec.policies.fixed import FixedGamma

POLICIES = {"fixed": FixedGamma}

__all__ = ["DraftPolicy", "FixedGamma", "POLICIES"]
