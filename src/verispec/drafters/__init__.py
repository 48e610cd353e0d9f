"""Drafters: one file per method, one registry line each. A registry entry builds a drafter from the loaded
target/drafter models and the method's options."""

from verispec.drafters.base import Drafter, NoDrafter
from verispec.drafters.draft_model import DraftModelDrafter
from verispec.drafters.hybrid import HybridDrafter
from verispec.drafters.lookahead import LookaheadDrafter
from verispec.drafters.ngram import NGramDrafter
from verispec.drafters.prompt_lookup import PromptLookupDrafter
from verispec.drafters.rest import RestDrafter

# method name -> (factory(ctx) -> Drafter, needs a draft model)
DRAFTERS = {
    "ar": (NoDrafter.from_ctx, False),
    "sd": (DraftModelDrafter.from_ctx, True),
    "nasd": (NGramDrafter.from_ctx, False),  # options: max_n, max_contexts, max_continuations, ...
    "pld": (PromptLookupDrafter.from_ctx, False),  # options: max_ngram_size, min_ngram_size, num_pred_tokens, ...
    "nasd+sd": (HybridDrafter.from_ctx, True),  # NASD options; min_context, min_count define a confident match
    "rest": (RestDrafter.from_ctx, False),  # options: datastore (required), max_suffix, min_suffix, max_occurrences
    "lookahead": (LookaheadDrafter.from_ctx, False),  # options: window, ngram, guesses, pool_from_text, seed
}

__all__ = ["Drafter", "NoDrafter", "DraftModelDrafter", "NGramDrafter", "PromptLookupDrafter", "HybridDrafter",
           "RestDrafter", "LookaheadDrafter", "DRAFTERS"]
