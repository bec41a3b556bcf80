"""Per-request decoding state, owned by the engine, and the packed proposal a drafter returns.

``SpecState`` lives on the model's device and is updated in place by the engine's step (no host
sync); drafters read it and never write it. ``Proposal`` is the packed token-tree layout that
``dspark.ops.verify`` and the runner's ``forward_tree`` take. ``cache_len`` is the one rule for
how many KV-cache slots a model needs beyond its committed tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from .ops import SamplingTensors

DRAFT_SEED_XOR = 0x5DEECE66D  # drafter coins are keyed by seed ^ this: independent of verify's


def cache_len(tokens: int, block: int) -> int:
    """KV-cache slots for up to ``tokens`` committed tokens plus one block of ``block`` rows
    written right after them (a verify block or a draft block: slots up to tokens - 1 + block),
    plus one spare slot."""
    return tokens + block + 1


class Proposal(NamedTuple):
    """Packed token trees, the layout ``dspark.ops.verify`` takes: request r owns nodes
    ``node_offsets[r]:node_offsets[r+1]``; node 0 of each request is the root = the anchor token
    (``SpecState.anchor()``, the last committed token, not yet in the target KV cache);
    ``parents`` are local ids (-1 at the root, else smaller than the node's id). The node count N
    and the drafter's ``max_nodes`` are static (shape-only), so CUDA graphs can replay the step."""
    draft_tokens: torch.Tensor  # [N] i64, root (anchor) first in every request
    parents: torch.Tensor  # [N] i64 local parent ids, -1 at the root
    draft_probs: Optional[torch.Tensor]  # [N, V] distribution each node was drawn from, or None
    node_offsets: torch.Tensor  # [R + 1] i64


@dataclass
class SpecState:
    """Per-request decoding state, all on the model's device.

    tokens[b, :n_tokens[b]] are the committed tokens (prompt, then generated); the last one is the
    anchor, at position n_tokens[b] - 1, which is also the target KV cache length.
    """
    tokens: torch.Tensor  # [B, C] i64
    n_tokens: torch.Tensor  # [B] i64
    prompt_lens: torch.Tensor  # [B] i64
    max_new: torch.Tensor  # [B] i64
    stop_tokens: torch.Tensor  # [B, S] i64, -1 padded
    params: SamplingTensors
    seeds: torch.Tensor  # [B] i64
    active: torch.Tensor  # [B] bool: not finished
    prompts: list  # host copy of the prompts (list of lists of ints)

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def capacity(self) -> int:
        return self.tokens.shape[1]

    def anchor_pos(self) -> torch.Tensor:
        return self.n_tokens - 1

    def anchor(self) -> torch.Tensor:
        return self.tokens.gather(1, (self.n_tokens - 1)[:, None])[:, 0]

    def draft_seeds(self) -> torch.Tensor:
        return self.seeds ^ DRAFT_SEED_XOR

    def append(self, out_tokens: torch.Tensor, accept_count: torch.Tensor) -> torch.Tensor:
        """Commit ``accept_count + 1`` tokens of out_tokens [B, W] per active request and update
        the finished flags (stop token or max_new reached). Returns the per-request count added."""
        W = out_tokens.shape[1]
        k = torch.arange(W, device=out_tokens.device)
        add = torch.where(self.active, accept_count + 1, 0)
        keep = k[None, :] < add[:, None]
        idx = (self.n_tokens[:, None] + k).clamp(max=self.capacity - 1)
        self.tokens.scatter_(1, idx, torch.where(keep, out_tokens, self.tokens.gather(1, idx)))
        stop = ((out_tokens[:, :, None] == self.stop_tokens[:, None, :]).any(-1) & keep).any(-1)
        self.n_tokens += add
        self.active &= ~stop & (self.n_tokens - self.prompt_lens < self.max_new)
        return add


def chain_proposal(anchor: torch.Tensor, drafts: torch.Tensor,
                   probs: Optional[torch.Tensor] = None) -> Proposal:
    """Pack chains: anchor [B], drafts [B, G] -> N = B * (G + 1) nodes; probs [B, G, V] or None
    (the root's row is unused by verify and set to the first draft's row)."""
    B, G = drafts.shape
    dev = drafts.device
    tokens = torch.cat([anchor[:, None], drafts], 1).reshape(-1)
    parents = (torch.arange(G + 1, device=dev) - 1).repeat(B)
    offsets = torch.arange(B + 1, device=dev) * (G + 1)
    if probs is not None:
        probs = torch.cat([probs[:, :1], probs], 1).reshape(B * (G + 1), -1)
    return Proposal(tokens, parents, probs, offsets)
