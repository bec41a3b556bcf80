"""Static KV cache and its post-verification commit.

Layout: ``k``, ``v`` are [layers, batch, kv_heads, max_len, head_dim]; slot s holds position s of
the committed sequence. Lengths live with the caller (the engine's committed-token counts): a
chain rollback is "don't advance the length" (stale slots past it are overwritten later). A tree
commit is one ``dspark::kv_commit`` (every layer, K and V; on CUDA a PyTorch gather/scatter until
that kernel has run its tests on a GPU).
"""
from __future__ import annotations

import itertools

import torch

from .. import ops

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
               accept_count: torch.Tensor, node_offsets: torch.Tensor | None = None) -> None:
        """Move the accepted tree path's K/V into contiguous slots (in place, no host sync inside
        dspark.ops.sync_checks(False) or a CUDA graph): one ``dspark::kv_commit``.

        start: [B] i64, cache slot of each request's root (node j of the verified block sits in
        slot start + j). accept_nodes: [B, W] i64 node ids, root first, then the accepted nodes
        in depth order (entries past ``accept_count`` are ignored): verify's flat ids with its
        ``node_offsets`` [B + 1], or *local* ids (root = 0) when node_offsets is None.
        accept_count: [B] accepted drafts. After the call slot start + d holds the accepted
        node at depth d, for d = 0..accept_count. For a chain nothing moves.
        """
        B, W = accept_nodes.shape
        if node_offsets is None:  # local ids: request b's nodes as flat ids b * W + j
            node_offsets = torch.arange(B + 1, device=start.device) * W
            accept_nodes = accept_nodes + node_offsets[:-1, None]
        if ops.op_in_use("kv_commit", self.k.device):
            ops.kv_commit(self.k, self.v, start, accept_nodes, accept_count, node_offsets)
            return
        # the former gather/scatter, where ops.CUDA_KERNEL_TESTED turns the op off; same result
        # (the reference moves gather before they write)
        local = (accept_nodes - node_offsets[:-1, None]).clamp(min=0)
        depth = torch.arange(W, device=start.device)[None, :]
        dst = start[:, None] + depth  # [B, W]
        src = torch.where(depth <= accept_count[:, None], start[:, None] + local, dst)
        bidx = torch.arange(B, device=start.device)[:, None]
        for buf in (self.k, self.v):
            buf[:, bidx, :, dst] = buf[:, bidx, :, src]  # [B, W, L, H, D] gathered, then written
