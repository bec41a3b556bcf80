"""The trained drafter methods, one entry each: what a method is built from and trained with.

Everything that differs between DSpark, DFlash and EAGLE-3 outside their own modules is read from
here (building, loading, the CLI's choices, spec defaults, loss weights, the training objective,
whether STS calibration applies), so a new trained method is one entry below plus its module.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .dspark_drafter import ParallelDrafter, ParallelDraftModel
from .eagle3 import Eagle3Drafter, Eagle3Model


@dataclass(frozen=True)
class DraftMethod:
    name: str
    model_class: type  # nn.Module built from a DrafterSpec; attach_target() shares target parts
    drafter_class: type  # the engine-facing Drafter wrapping a model
    # training objective: "block" = anchor-bounded parallel blocks (dspark/train/losses.py
    # block_losses); "unroll" = training-time-test unroll over every position (eagle_losses)
    objective: str
    loss_weights: tuple  # (ce, tv, confidence BCE) of the "block" objective
    spec_defaults: dict = field(default_factory=dict)  # DrafterSpec fields for_target() starts from
    sequential_head: bool = False  # head_type / markov_rank are the caller's choice
    summary: str = ""

    @property
    def uses_mask_token(self) -> bool:
        """Parallel backbones fill the block's draft slots with a MASK token."""
        return self.objective == "block"

    @property
    def calibrated(self) -> bool:
        """Has a confidence head that STS calibration fits."""
        return bool(self.spec_defaults.get("confidence_head"))


METHODS = {m.name: m for m in (
    DraftMethod("dspark", ParallelDraftModel, ParallelDrafter, "block", (0.1, 0.9, 1.0),
                dict(num_draft_layers=5, head_type="markov", markov_rank=256,
                     confidence_head=True, block_layout="anchor"),
                sequential_head=True,
                summary="parallel backbone + Markov/RNN head + confidence head (DSpark)"),
    DraftMethod("dflash", ParallelDraftModel, ParallelDrafter, "block", (1.0, 0.0, 0.0),
                dict(num_draft_layers=5, head_type="none", markov_rank=0,
                     confidence_head=False, block_layout="mask"),
                summary="parallel backbone, every slot sampled independently (DFlash)"),
    DraftMethod("eagle3", Eagle3Model, Eagle3Drafter, "unroll", (1.0, 0.0, 0.0),
                dict(num_draft_layers=1, head_type="none", markov_rank=0,
                     confidence_head=False, block_layout="anchor"),
                summary="one autoregressive layer over target features (EAGLE-3)"),
)}


def method_names() -> tuple:
    return tuple(METHODS)


def get_method(name: str) -> DraftMethod:
    """The registered method ``name``; ValueError naming the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown drafter method {name!r}; choose one of {method_names()}") \
            from None
