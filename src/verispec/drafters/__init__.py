"""Drafters: one file per method (the engine's "propose" stage). Each is registered in `verispec.registry`, whose
record names its factory, what it needs and the options it takes."""

from verispec.drafters.base import Drafter, NoDrafter, bounded_chain
from verispec.drafters.draft_model import DraftModelDrafter
from verispec.drafters.draft_tree import DraftTreeDrafter
from verispec.drafters.hybrid import HybridDrafter
from verispec.drafters.lookahead import LookaheadDrafter
from verispec.drafters.ngram import NGramDrafter
from verispec.drafters.prompt_lookup import PromptLookupDrafter
from verispec.drafters.rest import RestDrafter

__all__ = ["Drafter", "NoDrafter", "bounded_chain", "DraftModelDrafter", "DraftTreeDrafter", "NGramDrafter", "PromptLookupDrafter",
           "HybridDrafter", "RestDrafter", "LookaheadDrafter"]
