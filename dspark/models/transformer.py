"""Decoder-only transformer (Llama / Mistral / Qwen2 / Qwen3) over a static KV cache.

One forward serves prefill, decode and tree verification: every call processes a block of T new
tokens per request, written to cache slots ``start[b] .. start[b] + T - 1``; a query attends to the
committed cache (slots < start[b]) and to the block slots its ``block_mask`` row allows (causal for
prefill/chains, ancestors-and-self for trees). Positions are passed explicitly (tree depth).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import decode_attention, fused_linear
from .config import ModelConfig
from .layers import MLP, RMSNorm, apply_rope, rope

# A decode / verify forward over at most this many token rows (batch x block) runs on the dspark
# kernels (fused_linear + decode_attention): weights streamed once per 64 rows on tensor cores,
# and one summation order for every row count, so a token's logits are bit-identical in decode
# and verify (greedy speculative == greedy autoregressive in bf16). Above it cuBLAS + SDPA take
# over (faster for many rows, but their sums depend on the row count) unless the runner is
# batch_invariant. 64 = the rows one kernel pass covers. Where cuBLAS takes over faster depends on
# the model (H100, bench/RESULTS.md, ninth session): the Qwen3-8B shape's verify forward is faster
# on cuBLAS from 16 rows (32 rows: 12.1 vs 18.3 ms), the 24 x 256 benchmark pair's is faster on
# the fused kernels at every row count (63 rows 2.08 ms, 79 rows on cuBLAS 3.93 ms): the runner's
# ``fused_max_rows`` sets it per model (greedy identity holds up to it); "auto" measures it
# (dspark/crossover.py: ~320 rows for the pair, 2026-12-06 s13).
FUSED_MAX_ROWS = 64
# Token rows of one dspark::fused_linear pass (kLinearCols): a call's time grows per pass.
FUSED_TILE_ROWS = 64
# Tokens per request of a fused forward (dspark::decode_attention's limit).
FUSED_MAX_BLOCK = 64
# Above the fused rows, a decode / verify forward keeps dspark::decode_attention under cuBLAS
# projections (the runner's ``hybrid``: one kernel where the unfused attention core runs ~25 small
# ones a layer: QK-norm, rotary, cache write, masked SDPA over the whole cache) while the cache
# has at most this many slots. Measured on an H100 (bench/RESULTS.md, tenth session): ours is
# faster than SDPA up to 4096 slots, 1.6-1.7x slower at 32768.
HYBRID_MAX_SLOTS = 4096


class PackedLayout(NamedTuple):
    """Where the N packed token rows of a ragged verify sit in the padded [R, W] block layout.

    The projections and the MLP run on the packed rows only (their cost is what a scheduled
    verify saves); attention, rotary and the cache write run on the padded layout around them
    (:meth:`pad` before the attention core, :meth:`pack` after it). Block positions that no row
    fills hold a copy of packed row 0 (one gather per layer, no zero fill: their values are never
    read): they write their K/V into block slots past the request's nodes, never into the
    committed cache, no real row attends to them (they are no row's ancestor), and their outputs
    are dropped. Rows with ``dest == R * W`` are padding of a bucketed row count: no block
    position reads them, so they touch no cache slot and no other row's output."""
    dest: torch.Tensor  # [N] i64: flat padded index r * W + j of each packed row; R * W: padding
    src: torch.Tensor  # [N] i64: the same with padding rows read from index 0 (any real index)
    fill: torch.Tensor  # [R * W] i64: the packed row at each block position (0 where none)
    requests: int  # R
    width: int  # W

    @classmethod
    def of(cls, dest: torch.Tensor, src: torch.Tensor, requests: int,
           width: int) -> "PackedLayout":
        """The layout of packed rows placed at ``dest`` (R * W: a padding row)."""
        fill = torch.zeros(requests * width + 1, dtype=torch.int64, device=dest.device)
        fill[dest] = torch.arange(dest.shape[0], device=dest.device)  # padding rows: index R * W
        return cls(dest, src, fill[:requests * width], requests, width)

    @classmethod
    def from_offsets(cls, node_offsets: torch.Tensor, rows: int, width: int) -> "PackedLayout":
        """node_offsets [R + 1]: request r owns packed rows off[r]:off[r + 1]; rows from off[R]
        to ``rows`` are padding."""
        R, W = node_offsets.shape[0] - 1, width
        node = torch.arange(rows, device=node_offsets.device)
        # request of each row: how many request ends lie at or before it (a comparison-sum rather
        # than searchsorted, whose inductor lowering tripped a device-side assert); R = padding
        req = (node[:, None] >= node_offsets[None, 1:]).sum(1)
        flat = req * W + node - node_offsets.gather(0, req)
        return cls.of(torch.where(req < R, flat, R * W), torch.where(req < R, flat, 0), R, W)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[N, F] packed rows -> [R, W, F] (a copy of row 0 where no row sits)."""
        return x[self.fill].view(self.requests, self.width, -1)

    def pad_ids(self, ids: torch.Tensor, fill: int) -> torch.Tensor:
        """[N] per-row ids -> [R, W], ``fill`` where no row sits."""
        R, W = self.requests, self.width
        out = ids.new_full((R * W + 1,), fill)
        out[self.dest] = ids
        return out[:R * W].view(R, W)

    def pack(self, y: torch.Tensor) -> torch.Tensor:
        """[R, W, F] -> the packed rows [N, F] (padding rows get an arbitrary real row)."""
        return y.reshape(self.requests * self.width, -1)[self.src]


def padded(core, layout: Optional[PackedLayout]):
    """``core`` (an attention core: QKV rows [B, T, .] -> output rows) over the padded [R, W]
    block of ``layout``'s packed rows, packed again; ``core`` itself without a layout."""
    if layout is None:
        return core
    return lambda qkv: layout.pack(core(layout.pad(qkv)))


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.h, self.hkv, self.d = c.num_heads, c.num_kv_heads, c.head_dim
        self.qkv = nn.Linear(c.hidden_size, (self.h + 2 * self.hkv) * self.d, bias=c.attention_bias)
        self.o = nn.Linear(self.h * self.d, c.hidden_size, bias=c.o_bias)
        self.q_norm = RMSNorm(self.d, c.rms_norm_eps) if c.qk_norm else None
        self.k_norm = RMSNorm(self.d, c.rms_norm_eps) if c.qk_norm else None
        self.eps = c.rms_norm_eps
        self.window = 0  # sliding window of this layer (0 = none); set by Transformer

    def core(self, qkv, cos, sin, k_cache, v_cache, slots, mask, kv_limit, rows=None):
        """Everything between the QKV and output projections (QK-norm, rotary, cache write,
        attention). qkv: [B, T, (H + 2 Hkv) D]; cos/sin: [B, 1, T, D]; k_cache/v_cache:
        [B_cache, Hkv, S, D]; slots: [B, T]; rows: [B] i64, the cache row of each request (None:
        request b is cache row b) -> [B, T, H D]."""
        B, T, _ = qkv.shape
        q, k, v = qkv.split([self.h * self.d, self.hkv * self.d, self.hkv * self.d], -1)
        q = q.view(B, T, self.h, self.d)
        k = k.view(B, T, self.hkv, self.d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        bidx = (torch.arange(B, device=qkv.device) if rows is None else rows)[:, None]
        k_cache[bidx, :, slots] = k.transpose(1, 2)  # [B, T, Hkv, D] into slots
        v_cache[bidx, :, slots] = v.view(B, T, self.hkv, self.d)
        keys, values = k_cache[:, :, :kv_limit], v_cache[:, :, :kv_limit]
        if rows is not None:  # (a copy of the requests' rows, up to kv_limit slots)
            keys, values = keys.index_select(0, rows), values.index_select(0, rows)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                             enable_gqa=self.h != self.hkv)
        return out.transpose(1, 2).reshape(B, T, self.h * self.d)


class Block(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attn = Attention(c)
        self.mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP.from_config(c)

    def forward(self, x, cos, sin, k_cache, v_cache, slots, mask, kv_limit, layout=None,
                rows=None):
        a = self.attn
        return self._unfused(x, padded(lambda qkv: a.core(
            qkv, cos, sin, k_cache, v_cache, slots, mask, kv_limit, rows), layout))

    def decode(self, x, k_cache, v_cache, layer, start, inv_freq, parents=None, layout=None):
        """A block of T tokens per request on dspark kernels only: 4 fused_linear +
        decode_attention. x: [B, T, hidden], or the packed rows [N, hidden] of ``layout``;
        k_cache/v_cache: [L, B, Hkv, S, D] (slots start[b] + t of ``layer`` are written);
        start: [B]; parents: [B, T] local ids (-1 at roots) or None (a causal chain); inv_freq:
        [D/2] f32."""
        return self._fused(x, self._attend(k_cache, v_cache, layer, start, inv_freq, parents,
                                           layout))

    def hybrid(self, x, k_cache, v_cache, layer, start, inv_freq, parents=None, layout=None):
        """:meth:`decode`'s block (same arguments) with the module projections, norms and MLP
        (cuBLAS, as :meth:`forward`) around dspark::decode_attention: for row counts where
        cuBLAS streams the weights faster than fused_linear, the attention core stays one
        kernel. Its sums depend on the row count (the GEMMs'), unlike :meth:`decode`'s."""
        return self._unfused(x, self._attend(k_cache, v_cache, layer, start, inv_freq, parents,
                                             layout))

    def _attend(self, k_cache, v_cache, layer, start, inv_freq, parents, layout):
        """The attention core on dspark::decode_attention: the QKV projection's rows -> the
        attention output rows (around the padded block of ``layout``'s packed rows)."""
        a = self.attn
        q_norm = a.q_norm.weight if a.q_norm is not None else None
        k_norm = a.k_norm.weight if a.k_norm is not None else None
        return padded(lambda qkv: decode_attention(qkv, k_cache, v_cache, layer, start, inv_freq,
                                                   a.h, q_norm, k_norm, a.eps, a.window,
                                                   parents), layout)

    def _unfused(self, x, attend):
        """The block on the module ops (cuBLAS projections, RMSNorm, MLP); ``attend`` maps the
        QKV projection to the attention output."""
        a = self.attn
        x = x + a.o(attend(a.qkv(self.attn_norm(x))))
        return x + self.mlp(self.mlp_norm(x))

    def _fused(self, x, attend):
        """The block on four dspark::fused_linear calls (RMSNorm folded into the QKV and gate/up
        projections, SiLU(gate)*up into the down projection, residual adds into o and down);
        ``attend`` maps the QKV projection to the attention output."""
        a, m = self.attn, self.mlp
        qkv = fused_linear(x, a.qkv.weight, a.qkv.bias, norm_weight=self.attn_norm.weight,
                           eps=self.attn_norm.eps)
        h = fused_linear(attend(qkv), a.o.weight, a.o.bias, residual=x)
        gate_up = fused_linear(h, m.gate_up.weight, m.gate_up.bias,
                               norm_weight=self.mlp_norm.weight, eps=self.mlp_norm.eps)
        return fused_linear(gate_up, m.down.weight, m.down.bias, residual=h, silu_gate=True)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(self._block(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        for layer, window in zip(self.layers, c.sliding_window):
            layer.attn.window = window or 0
        self.register_buffer("inv_freq", c.inv_freq(), persistent=False)

    def _block(self, c: ModelConfig) -> Block:
        return Block(c)  # (a tensor-parallel model builds its shards' blocks: models/tp.py)

    @property
    def cache_kv_heads(self) -> int:
        """KV heads this model's cache holds (a tensor-parallel shard holds its own heads)."""
        return self.config.num_kv_heads

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def _masks(self, positions, start, block_mask, kv_limit):
        """Boolean attention masks [B, 1, T, S] (one per distinct sliding window)."""
        B, T = positions.shape
        rel = torch.arange(kv_limit, device=start.device)[None, :] - start[:, None]  # [B, S]
        in_block = (rel >= 0) & (rel < T)
        j = rel.clamp(0, T - 1)
        seen = block_mask.gather(2, j[:, None, :].expand(B, T, kv_limit))  # [B, T, S]
        full = (rel < 0)[:, None, :] | (in_block[:, None, :] & seen)
        masks = {None: full[:, None]}
        for w in set(self.config.sliding_window) - {None}:
            key_pos = torch.where(in_block, positions.gather(1, j), rel + start[:, None])
            near = (positions[:, :, None] - key_pos[:, None, :]) < w
            masks[w] = (full & near)[:, None]
        return masks

    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor], start: torch.Tensor,
                block_mask: Optional[torch.Tensor], k_cache: torch.Tensor, v_cache: torch.Tensor,
                kv_limit: int, taps: Sequence[int] = (), fused: Union[bool, str] = False,
                parents: Optional[torch.Tensor] = None,
                layout: Optional[PackedLayout] = None,
                rows: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, list]:
        """tokens, positions: [B, T] i64; start: [B] i64 (first cache slot of the block);
        block_mask: [B, T, T] bool (query t may see block slot j); k_cache/v_cache:
        [L, B, Hkv, S, D]. Returns the final residual stream [B, T, hidden] (pre-norm) and the
        tapped residual streams (layer l's output; -1 = embedding output), in ``taps`` order.
        ``fused``: every block on the dspark kernels (see :meth:`can_fuse`), or "attention":
        only the attention core on them (:meth:`Block.hybrid`); the block's tree is
        then given by ``parents`` [B, T] (local ids, -1 at roots; None = a causal chain), row t
        sitting at position start + depth(t): positions and block_mask are not used (may be
        None), and no masks or rotary tables are built.
        ``layout``: tokens are the packed rows [N] of a ragged block (:class:`PackedLayout`);
        positions, block_mask and parents keep the padded [B, T] layout; the residual streams
        returned are packed [N, hidden].
        ``rows`` [B] i64: the cache row of each request (None: request b is row b; not fused)."""
        if fused not in (False, True, "attention"):
            raise ValueError(f"fused must be False, True or 'attention', got {fused!r}")
        B, T = tokens.shape if layout is None else (layout.requests, layout.width)
        x = self.embed(tokens)
        if fused and rows is not None:
            raise ValueError("cache rows other than the batch's own need the unfused forward")
        if fused:
            inv_freq = self.inv_freq.float()
            tapped = {-1: x} if -1 in taps else {}
            for i, layer in enumerate(self.layers):
                step = layer.decode if fused is True else layer.hybrid
                x = step(x, k_cache, v_cache, i, start, inv_freq, parents, layout)
                if i in taps:
                    tapped[i] = x
            return x, [tapped[t] for t in taps]
        cos, sin = rope(positions, self.inv_freq, x.dtype)  # [B, 1, T, D]
        slots = start[:, None] + torch.arange(T, device=tokens.device)
        masks = self._masks(positions, start, block_mask, kv_limit)
        tapped = {-1: x} if -1 in taps else {}
        for i, layer in enumerate(self.layers):
            mask = masks[self.config.sliding_window[i]]
            x = layer(x, cos, sin, k_cache[i], v_cache[i], slots, mask, kv_limit, layout, rows)
            if i in taps:
                tapped[i] = x
        return x, [tapped[t] for t in taps]

    def can_fuse(self, rows: int, block: int = 1, max_rows: int = FUSED_MAX_ROWS) -> bool:
        """Whether a forward over ``rows`` token rows in blocks of ``block`` tokens per request
        runs on the dspark kernels (at most ``max_rows`` rows, a short block, and the SiLU-gated
        MLP the down-projection kernel folds in)."""
        return self.fusable(block) and rows <= max_rows

    def fusable(self, block: int = 1) -> bool:
        """Whether the dspark kernels can run this model's forward at all (any row count)."""
        return block <= FUSED_MAX_BLOCK and self.config.hidden_act == "silu"

    def logits(self, h: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """Final norm + LM head; logits in float32."""
        if fused:
            return fused_linear(h, self.lm_head.weight, norm_weight=self.norm.weight,
                                eps=self.norm.eps).float()
        return self.lm_head(self.norm(h)).float()
