"""The drafter interface the engine drives.

Per generate() call the engine calls ``setup(batch, capacity)`` once, ``start(state, prefill)``
after the target prefill, then per speculative step ``propose(state)`` -> one packed target
forward -> ``dspark.ops.verify`` -> ``commit(...)``. Nothing here may sync with the host. The
state (:class:`dspark.state.SpecState`) is the engine's: drafters read it, never write it; the
proposal layout is :class:`dspark.state.Proposal`'s.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..ops import VerifyResult
from ..state import Proposal, SpecState


class Drafter:
    """Base class. Subclasses set ``gamma`` (max draft depth), ``max_nodes`` (static nodes per
    request incl. the root), ``is_chain`` (nodes are a chain in id order: no KV compaction needed)
    and ``vocab_size`` (None if model-free); ``target_taps`` lists the target layers whose hidden
    states ``start``/``commit`` want (the engine taps them in prefill and verify)."""

    gamma: int = 1
    vocab_size: Optional[int] = None
    target_taps: Sequence[int] = ()

    @property
    def max_nodes(self) -> int:
        return self.gamma + 1

    @property
    def graphable(self) -> bool:
        """Whether propose/commit may be captured in CUDA graphs: everything they read or write
        lives in buffers that persist across steps, and they never sync with the host."""
        return True

    def graph_key(self) -> tuple:
        """Changes whenever the drafter reallocates the buffers its graphs read (subclasses
        that keep buffers call :meth:`_buffers_changed` when they allocate them)."""
        return (getattr(self, "_buffers_serial", 0),)

    def _buffers_changed(self) -> None:
        self._buffers_serial = getattr(self, "_buffers_serial", 0) + 1

    @property
    def is_chain(self) -> bool:
        return True

    def compile(self, mode: Optional[str] = None) -> None:
        """torch.compile the drafter's hot bodies (fewer, fused kernels per step: a drafter's
        step is many small PyTorch ops). Default: nothing to compile."""

    @property
    def has_confidences(self) -> bool:
        """Whether :meth:`confidences` gives calibrated acceptance probabilities of the last
        proposal's drafts (what confidence-scheduled verification ranks; DSpark's head)."""
        return False

    def confidences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """c [B, gamma]: P(draft k accepted | drafts before it accepted), and the prefix
        survival a = cumprod(c), of the last proposal (device tensors, no host sync)."""
        raise ValueError(f"{type(self).__name__} has no confidence head")

    def setup(self, batch: int, capacity: int) -> None:
        """Allocate per-batch state (called once per generate() before ``start``)."""

    def start(self, state: SpecState, target_hidden: Optional[torch.Tensor]) -> None:
        """After the target prefill. state.tokens holds prompt + first sampled token (the anchor);
        target_hidden: [len(target_taps), B, T_max, hidden] prompt features, or None."""

    @property
    def refillable(self) -> bool:
        """Whether :meth:`start_rows` is implemented (continuous batching can use it)."""
        return type(self).start_rows is not Drafter.start_rows

    def start_rows(self, state: SpecState, rows: list,
                   target_hidden: Optional[torch.Tensor]) -> None:
        """``start`` for the given rows only, the others mid-generation: their slots were
        refilled with new prompts (continuous batching, dspark/serve.py); target_hidden:
        [len(target_taps), len(rows), T_max, hidden] of those prompts, or None."""
        raise ValueError(f"{type(self).__name__} cannot refill single requests (continuous "
                         f"batching): use a trained, draft-model or n-gram drafter")

    def propose(self, state: SpecState) -> Proposal:
        raise NotImplementedError

    def commit(self, state: SpecState, proposal: Proposal, result: VerifyResult,
               root_pos: torch.Tensor, target_hidden: Optional[torch.Tensor]) -> None:
        """After verification; ``state`` is already advanced (new anchor = bonus/correction token).
        root_pos: [B] the verified root's position; result.accept_nodes: flat node ids of the
        accepted path; target_hidden: [len(target_taps), N, hidden] verify features, or None."""
