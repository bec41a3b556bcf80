"""Prompt-lookup (n-gram) drafter: model-free and deterministic (draft_probs = None).

For the longest n in max_ngram..min_ngram whose last-n committed tokens occurred earlier in the
request's context, propose the gamma tokens that followed the most recent such occurrence
(continued periodically when they run into the end of the context). Without a match the anchor
is repeated. Runs on device with static shapes (no host sync).
"""
from __future__ import annotations

import torch

from ..state import Proposal, SpecState, chain_proposal
from .base import Drafter


class NgramDrafter(Drafter):
    def __init__(self, gamma: int = 4, max_ngram: int = 3, min_ngram: int = 1):
        if gamma < 1 or not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need gamma >= 1 and 1 <= min_ngram <= max_ngram, got "
                             f"{gamma}, {min_ngram}, {max_ngram}")
        self.gamma, self.max_ngram, self.min_ngram = gamma, max_ngram, min_ngram

    def propose(self, state: SpecState) -> Proposal:
        toks, n = state.tokens, state.n_tokens  # [B, C], [B]
        B, C = toks.shape
        dev = toks.device
        cont = n - 1  # continuation start; default: repeat the anchor
        found = torch.zeros(B, dtype=torch.bool, device=dev)
        for size in range(self.max_ngram, self.min_ngram - 1, -1):
            if size >= C:
                continue
            at = n[:, None] - size + torch.arange(size, device=dev)
            suffix = toks.gather(1, at.clamp(min=0))
            windows = toks.unfold(1, size, 1)  # [B, C - size + 1, size]
            begin = torch.arange(windows.shape[1], device=dev)
            match = (windows == suffix[:, None, :]).all(-1) & (begin[None, :] + size < n[:, None])
            last = torch.where(match, begin, -1).max(1).values
            hit = (last >= 0) & ~found & (n > size)
            cont = torch.where(hit, last + size, cont)
            found |= hit
        period = n - cont  # >= 1
        idx = cont[:, None] + torch.arange(self.gamma, device=dev) % period[:, None]
        return chain_proposal(state.anchor(), toks.gather(1, idx))
