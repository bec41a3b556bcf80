"""The frozen target's per-position features for draft training, computed online (one forward,
no KV reuse): raw tapped residual streams (concatenated in tap order, as the engine's prefill /
verify taps are) and the final *post-norm* hidden state, from which target logits are recomputed
with the frozen LM head only at the rows a loss needs (method doc 6.2)."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from ..models.kv import KVCache
from ..models.transformer import Transformer


class TargetFeatures(NamedTuple):
    feats: torch.Tensor  # [B, S, m * d] raw tapped layer outputs, tap order
    final: torch.Tensor  # [B, S, d] final hidden after the target's final norm


@torch.no_grad()
def target_features(model: Transformer, ids: torch.Tensor, taps: Sequence[int]) -> TargetFeatures:
    """ids [B, S] (right padding is harmless: attention is causal)."""
    B, S = ids.shape
    c = model.config
    dev = ids.device
    cache = KVCache(c.num_layers, B, c.num_kv_heads, S, c.head_dim, model.dtype, dev)
    positions = torch.arange(S, device=dev).expand(B, S)
    causal = torch.ones(S, S, dtype=torch.bool, device=dev).tril().expand(B, S, S)
    start = torch.zeros(B, dtype=torch.int64, device=dev)
    h, tapped = model(ids, positions, start, causal, cache.k, cache.v, S, list(taps))
    return TargetFeatures(torch.cat(tapped, -1), model.norm(h))


@torch.no_grad()
def target_logits(model: Transformer, final_rows: torch.Tensor) -> torch.Tensor:
    """Frozen LM head on post-norm hidden rows [..., d] -> fp32 logits [..., V]."""
    return model.lm_head(final_rows.to(model.dtype)).float()
