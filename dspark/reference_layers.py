"""Plain-PyTorch reference of the decode-path layer ops (dspark::fused_linear,
dspark::decode_attention): part of the executable specification that ``dspark.reference``
re-exports (one namespace for the tests)."""
from __future__ import annotations

import math

import torch


# ---- fused_linear ---------------------------------------------------------------------------
def fused_linear_input(x, weight, norm_weight=None, eps=1e-6, silu_gate=False):
    """xhat of fused_linear: x, RMSNorm(x) * norm_weight, or silu(gate) * up (stored in x's
    dtype)."""
    dt = x.dtype
    if silu_gate:
        gate, up = x.float().split(weight.shape[1], -1)
        return (torch.nn.functional.silu(gate).to(dt).float() * up).to(dt)
    if norm_weight is not None:
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dt)
        return (norm_weight.float() * normed.float()).to(dt)
    return x


def fused_linear(x, weight, bias=None, residual=None, norm_weight=None, eps=1e-6, silu_gate=False):
    """What dspark::fused_linear computes, written as the unfused modules it replaces (RMSNorm ->
    Linear -> residual add, or SiLU(gate) * up -> Linear -> residual add). x [M, K] (or [M, 2K]),
    weight [N, K] -> [M, N]. Every intermediate is stored in x's dtype; the matmul sums in fp32."""
    dt = x.dtype
    y = fused_linear_input(x, weight, norm_weight, eps, silu_gate).float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    y = y.to(dt)
    if residual is not None:
        y = (residual.float() + y.float()).to(dt)
    return y


# ---- decode_attention -----------------------------------------------------------------------
def _norm_rope(x, weight, eps, cos, sin):
    """x [..., D] in dtype T: per-head RMSNorm (if weight) then rotary with T-rounded cos/sin,
    each product and the sum rounded to T (what the model's separate ops store)."""
    dt = x.dtype
    if weight is not None:
        xf = x.float()
        x = (weight.float()
             * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dt).float()).to(dt)
    x1, x2 = x.chunk(2, -1)
    rot = torch.cat((-x2, x1), -1)
    return ((x.float() * cos.float()).to(dt).float()
            + (rot.float() * sin.float()).to(dt).float()).to(dt)


def tree_paths(parents: list) -> list:
    """Ancestors of each node from the root to itself (parents: local ids, -1 at roots)."""
    paths = []
    for j, q in enumerate(parents):
        paths.append((paths[q] if q >= 0 else []) + [j])
    return paths


def decode_attention(qkv, k_cache, v_cache, layer, positions, inv_freq, q_norm_weight,
                     k_norm_weight, eps, num_heads, window, parents=None):
    """What dspark::decode_attention computes (mutates k_cache/v_cache like the op): per request,
    write each row's rotated k and v at slot positions[b] + j, then softmax(q K^T / sqrt(D)) V in
    fp32 over the row's virtual slots (the cache below positions[b], then its ancestors), output
    rounded to qkv's dtype. qkv [B, W] (one row) or [B, T, W]; returns [B, H * D] or
    [B, T, H * D]."""
    squeeze = qkv.dim() == 2
    q3 = qkv[:, None] if squeeze else qkv
    B, T = q3.shape[:2]
    Hkv, S, D = k_cache.shape[2], k_cache.shape[3], k_cache.shape[4]
    H, dt = num_heads, qkv.dtype
    out = torch.empty(B, T, H * D, dtype=dt)
    for b in range(B):
        st = int(positions[b])
        if not (0 <= st and st + T <= S):
            raise ValueError(f"positions must lie in [0, {S}) with room for {T} rows, got {st}")
        par = list(range(-1, T - 1)) if parents is None else [int(x) for x in parents[b]]
        if any(not -1 <= x < j for j, x in enumerate(par)):
            raise ValueError(f"parents must be -1 or a smaller row id, got {par}")
        paths = tree_paths(par)
        pos = [st + len(p) - 1 for p in paths]

        def rope_tables(p):
            f = torch.tensor(float(p), dtype=torch.float32) * inv_freq.float().cpu()
            emb = torch.cat((f, f))
            return emb.cos().to(dt), emb.sin().to(dt)
        for j in range(T):
            k = q3[b, j, H * D:(H + Hkv) * D].view(Hkv, D)
            k_cache[layer, b, :, st + j] = _norm_rope(k, k_norm_weight, eps, *rope_tables(pos[j]))
            v_cache[layer, b, :, st + j] = q3[b, j, (H + Hkv) * D:].view(Hkv, D)
        for j in range(T):
            p = pos[j]
            lo = max(0, p - window + 1) if window > 0 else 0
            slots = [v if v < st else st + paths[j][v - st] for v in range(lo, p + 1)]
            q = _norm_rope(q3[b, j, :H * D].view(H, D), q_norm_weight, eps, *rope_tables(p))
            keys = k_cache[layer, b][:, slots].float()  # [Hkv, n, D]
            vals = v_cache[layer, b][:, slots].float()
            group = H // Hkv
            kk, vv = keys.repeat_interleave(group, 0), vals.repeat_interleave(group, 0)
            scores = torch.einsum("hd,hnd->hn", q.float(), kk) / math.sqrt(D)
            out[b, j] = torch.einsum("hn,hnd->hd", scores.softmax(-1), vv).to(dt).reshape(-1)
    return out[:, 0] if squeeze else out
