"""Prompt-lookup (n-gram) drafter: model-free and deterministic (draft_probs = None).

For the longest n in max_ngram..min_ngram whose last-n committed tokens occurred earlier in the
request's context, propose the gamma tokens that followed the most recent such occurrence
(continued periodically when they run into the end of the context). Without a match the anchor
is repeated. One dspark::ngram_propose kernel (spec: dspark.reference.ngram_propose), static
shapes, no host sync.
"""
from __future__ import annotations

import torch

from .. import ops
from ..state import Proposal, SpecState
from .base import Drafter


class NgramDrafter(Drafter):
    def __init__(self, gamma: int = 4, max_ngram: int = 3, min_ngram: int = 1):
        if gamma < 1 or not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need gamma >= 1 and 1 <= min_ngram <= max_ngram, got "
                             f"{gamma}, {min_ngram}, {max_ngram}")
        self.gamma, self.max_ngram, self.min_ngram = gamma, max_ngram, min_ngram
        self._layout, self._chain = None, None

    def setup(self, batch: int, capacity: int) -> None:
        if self._layout != (batch, self.gamma):
            self._layout = (batch, self.gamma)
            self._chain = None  # parents / offsets: made at the first (eager) proposal, then kept
            self._buffers_changed()

    def start_rows(self, state: SpecState, rows: list, target_hidden=None) -> None:
        """Nothing to refill: a proposal reads the committed tokens."""

    def propose(self, state: SpecState) -> Proposal:
        # one dspark::ngram_propose kernel: [B, gamma + 1] = anchor, then the drafts
        drafts = ops.ngram_propose(state.tokens, state.n_tokens, self.gamma, self.max_ngram,
                                   self.min_ngram)
        B, G1 = drafts.shape
        if self._chain is None or self._chain[0].device != drafts.device:
            dev = drafts.device
            self._chain = ((torch.arange(G1, device=dev) - 1).repeat(B),
                           torch.arange(B + 1, device=dev) * G1)
        parents, offsets = self._chain
        return Proposal(drafts.view(-1), parents, None, offsets)
