"""Drafters: one file per method, one registry line each. A registry entry builds a drafter from the loaded
target/drafter models and the method's options."""

from verispec.drafters.base import Drafter, NoDrafter
from verispec.drafters.draft_model import DraftModelDrafter

# method name -> (factory(ctx) -> Drafter, needs a draft model)
DRAFTERS = {
    "ar": (lambda ctx: NoDrafter(), False),
    "sd": (lambda ctx: DraftModelDrafter(ctx.drafter.model, ctx.target.vocab_size, ctx.stop_ids), True),
}

__all__ = ["Drafter", "NoDrafter", "DraftModelDrafter", "DRAFTERS"]
