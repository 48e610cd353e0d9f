"""Verifiers: decide which drafts to keep and which token the target adds. Registry: name -> class."""

from verispec.verifiers.rejection import RejectionVerifier

VERIFIERS = {"rejection": RejectionVerifier}

__all__ = ["RejectionVerifier", "VERIFIERS"]
