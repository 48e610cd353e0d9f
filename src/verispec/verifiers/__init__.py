"""Verifiers: decide which drafts to keep and which token the target adds (one file each; registered in
`verispec.registry.VERIFIERS`). Token trees, sampled or deterministic, are verified by the multi-step rule in
`tree.py` whichever chain verifier is chosen."""

from verispec.verifiers.block import BlockVerifier
from verispec.verifiers.rejection import RejectionVerifier

__all__ = ["RejectionVerifier", "BlockVerifier"]
