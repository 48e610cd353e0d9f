"""Verifiers: decide which drafts to keep and which token the target adds (one file each; registered in
`verispec.registry.VERIFIERS`). `rejection` and `block` send token trees, sampled or deterministic, to the
multi-step rule in `tree.py`; `traversal` verifies trees leaf to root and sends chains to `block`."""

from verispec.verifiers.block import BlockVerifier
from verispec.verifiers.rejection import RejectionVerifier
from verispec.verifiers.traversal import TraversalVerifier

__all__ = ["RejectionVerifier", "BlockVerifier", "TraversalVerifier"]
