"""Static KV cache and its post-verification commit.

Layout: ``k``, ``v`` are [layers, batch, kv_heads, max_len, head_dim]; slot s holds position s of
the committed sequence. Lengths live with the caller (the engine's committed-token counts): a
chain rollback is "don't advance the length" (stale slots past it are overwritten later).
"""
from __future__ import annotations

import itertools

import torch

_serials = itertools.count(1)


class KVCache:
    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (num_layers, batch, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.serial = next(_serials)  # names this allocation (CUDA graphs read its addresses)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


    def commit(self, start: torch.Tensor, accept_nodes: torch.Tensor,
               accept_count: torch.Tensor) -> None:
        """Move the accepted tree path's K/V into contiguous slots (in place, no host sync).

        start: [B] i64, cache slot of each request's root (node j of the verified block sits in
        slot start + j). accept_nodes: [B, W] i64 *local* node ids (root first, then the accepted
        nodes in depth order; entries past ``accept_count`` are ignored). accept_count: [B]
        accepted drafts. After the call slot start + d holds the accepted node at depth d, for
        d = 0..accept_count. For a chain accept_nodes[b, d] == d and nothing changes.
        """
        B, W = accept_nodes.shape
        depth = torch.arange(W, device=start.device)[None, :]
        valid = depth <= accept_count[:, None]
        dst = start[:, None] + depth  # [B, W]
        src = torch.where(valid, start[:, None] + accept_nodes.clamp(min=0), dst)
        bidx = torch.arange(B, device=start.device)[:, None]
        for buf in (self.k, self.v):
            moved = buf[:, bidx, :, src]  # [B, W, L, H, D] (advanced indices first)
            buf[:, bidx, :, dst] = moved
