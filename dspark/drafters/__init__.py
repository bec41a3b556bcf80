"""Drafters: the interface (base.Drafter), the trained methods (registry.METHODS: DSpark, DFlash,
EAGLE-3), a draft LM and n-gram prompt lookup; ``load_drafter`` loads any of them from a dir."""
from .base import Drafter
from .draft_model import DraftModelDrafter
from .dspark_drafter import ParallelDrafter, ParallelDraftModel
from .eagle3 import Eagle3Drafter, Eagle3Model
from .io import (
    build_draft_model,
    drafter_kind,
    load_draft_model,
    load_drafter,
    make_drafter,
    save_drafter,
)
from .ngram import NgramDrafter
from .registry import METHODS, DraftMethod, get_method, method_names
from .spec import DrafterSpec, default_mask_token, default_taps

__all__ = ["Drafter", "DraftModelDrafter", "NgramDrafter", "ParallelDraftModel",
           "ParallelDrafter", "Eagle3Model", "Eagle3Drafter", "DrafterSpec", "default_taps",
           "default_mask_token", "build_draft_model", "drafter_kind", "load_draft_model",
           "load_drafter", "make_drafter", "save_drafter", "METHODS", "DraftMethod",
           "get_method", "method_names"]
