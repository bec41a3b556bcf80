"""Drafters: the interface (base.Drafter) and model-based / model-free implementations."""
from .base import DRAFT_SEED_XOR, Drafter, Proposal, SpecState, chain_proposal
from .draft_model import DraftModelDrafter
from .ngram import NgramDrafter

__all__ = ["DRAFT_SEED_XOR", "Drafter", "Proposal", "SpecState", "chain_proposal",
           "DraftModelDrafter", "NgramDrafter"]
