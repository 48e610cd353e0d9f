"""verispec: lossless speculative decoding for HuggingFace causal LMs, and a benchmark that tells the truth.

The public names are imported on first use (PEP 562), so `import verispec.registry` or `verispec --help` does not
pull in torch and transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {"generate": "verispec.api", "GenerationOutput": "verispec.api", "METHODS": "verispec.registry",
           "POLICIES": "verispec.registry", "Sampling": "verispec.sampling", "load_model": "verispec.models",
           "LoadedModel": "verispec.models", "check_compatible": "verispec.models"}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'verispec' has no attribute {name!r}")
