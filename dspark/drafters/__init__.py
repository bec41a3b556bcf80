"""Drafters: the interface (base.Drafter) and model-based / model-free implementations."""
from .base import DRAFT_SEED_XOR, Drafter, Proposal, SpecState, chain_proposal
from .draft_model import DraftModelDrafter
from .dspark_drafter import ParallelDrafter, ParallelDraftModel
from .eagle3 import Eagle3Drafter, Eagle3Model
from .io import build_draft_model, load_draft_model, load_drafter, make_drafter, save_drafter
from .ngram import NgramDrafter
from .spec import DrafterSpec, default_mask_token, default_taps

__all__ = ["DRAFT_SEED_XOR", "Drafter", "Proposal", "SpecState", "chain_proposal",
           "DraftModelDrafter", "NgramDrafter", "ParallelDraftModel", "ParallelDrafter",
           "Eagle3Model", "Eagle3Drafter", "DrafterSpec", "default_taps", "default_mask_token",
           "build_draft_model", "load_draft_model", "load_drafter", "make_drafter",
           "save_drafter"]
