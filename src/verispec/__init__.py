"""verispec: lossless speculative decoding for HuggingFace causal LMs, and a benchmark that tells the truth."""

from verispec.api import METHODS, GenerationOutput, generate
from verispec.models import LoadedModel, check_compatible, load_model
from verispec.sampling import Sampling

__version__ = "0.1.0"
__all__ = ["generate", "GenerationOutput", "METHODS", "Sampling", "load_model", "LoadedModel", "check_compatible"]
