"""Building blocks of the feature-conditioned drafters: attention projections in the target
family's style (Qwen3 per-head QK RMSNorm, optional biases), the Markov / RNN sequential heads
and the confidence head (docs/method.md, "Drafter" and "Confidence"). RMSNorm, RoPE and the
gated MLP are the target's own (:mod:`dspark.models.layers`)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..models.config import ModelConfig
from ..models.layers import RMSNorm, apply_rope

__all__ = ["Projections", "attend", "init_weights", "MarkovHead", "RNNHead", "ConfidenceHead",
           "sts_scale", "sts_tensor"]


class Projections(nn.Module):
    """q/k/v/o projections of one attention layer; ``in_dim`` is the width of its input (the
    hidden size, or 2x for EAGLE-3's [embedding; hidden] input)."""

    def __init__(self, c: ModelConfig, in_dim: Optional[int] = None):
        super().__init__()
        in_dim = in_dim or c.hidden_size
        self.h, self.hkv, self.d = c.num_heads, c.num_kv_heads, c.head_dim
        self.q = nn.Linear(in_dim, self.h * self.d, bias=c.attention_bias)
        self.k = nn.Linear(in_dim, self.hkv * self.d, bias=c.attention_bias)
        self.v = nn.Linear(in_dim, self.hkv * self.d, bias=c.attention_bias)
        self.o = nn.Linear(self.h * self.d, c.hidden_size, bias=c.o_bias)
        self.q_norm = RMSNorm(self.d, c.rms_norm_eps) if c.qk_norm else None
        self.k_norm = RMSNorm(self.d, c.rms_norm_eps) if c.qk_norm else None

    def query(self, x, cos, sin) -> torch.Tensor:
        """x [B, T, in] -> q [B, H, T, D] (QK-norm, then RoPE)."""
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.h, self.d)
        if self.q_norm is not None:
            q = self.q_norm(q)
        return apply_rope(q.transpose(1, 2), cos, sin)

    def key_value(self, x, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, in] -> k, v [B, Hkv, T, D] (K: QK-norm, then RoPE; V as is)."""
        B, T, _ = x.shape
        k = self.k(x).view(B, T, self.hkv, self.d)
        if self.k_norm is not None:
            k = self.k_norm(k)
        k = k.transpose(1, 2)
        v = self.v(x).view(B, T, self.hkv, self.d).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    def out(self, attn: torch.Tensor) -> torch.Tensor:
        """attn [B, H, T, D] -> [B, T, hidden]."""
        B, _, T, _ = attn.shape
        return self.o(attn.transpose(1, 2).reshape(B, T, self.h * self.d))


def attend(q, k, v, mask) -> torch.Tensor:
    """Scaled dot-product attention, GQA, boolean mask [B, 1, Tq, Tk] (True = visible).
    K/V heads are repeated explicitly: with an arbitrary mask, SDPA's enable_gqa path falls back
    to the math kernel on CUDA (a [B, H, Tq, Tk] score tensor per layer in training)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.to(q.dtype), v.to(q.dtype)
    if rep > 1:
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """HF-style init: linear/embedding weights N(0, std), biases 0, norms 1."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)


class MarkovHead(nn.Module):
    """Low-rank first-order Markov bias B(x_{k-1}, .) = W1[x_{k-1}] W2, W1 [V, r], W2 [r, V]."""

    def __init__(self, vocab: int, rank: int):
        super().__init__()
        self.rank = rank
        self.w1 = nn.Embedding(vocab, rank)
        self.w2 = nn.Linear(rank, vocab, bias=False)

    def init_state(self, shape, ref: torch.Tensor):
        return None

    def step(self, prev: torch.Tensor, h: torch.Tensor, state):
        """prev [...] previous tokens, h [..., d] backbone hidden -> bias [..., V] fp32, state."""
        return self.w2(self.w1(prev)).float(), state

    def unroll(self, prev: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Teacher-forced over a block: prev [..., G], h [..., G, d] -> bias [..., G, V] fp32."""
        return self.w2(self.w1(prev)).float()


class RNNHead(MarkovHead):
    """s_k = sig(g) s_{k-1} + (1 - sig(g)) tanh(c), B_k = tanh(o) W2, (g, c, o) = Lin([s_{k-1};
    W1[x_{k-1}]; H_d[k]]) (method doc 2.2; o comes from s_{k-1}, not s_k)."""

    def __init__(self, vocab: int, rank: int, hidden: int):
        super().__init__(vocab, rank)
        self.cell = nn.Linear(2 * rank + hidden, 3 * rank)

    def init_state(self, shape, ref: torch.Tensor):
        return torch.zeros(*shape, self.rank, dtype=self.cell.weight.dtype, device=ref.device)

    def step(self, prev, h, state):
        e = self.w1(prev)
        z = torch.cat([state.to(e.dtype), e, h.to(e.dtype)], -1)
        g, c, o = self.cell(z).chunk(3, -1)
        gate = torch.sigmoid(g)
        state = gate * state + (1 - gate) * torch.tanh(c)
        return self.w2(torch.tanh(o)).float(), state

    def unroll(self, prev, h):
        state = self.init_state(prev.shape[:-1], h)
        out = []
        for k in range(prev.shape[-1]):
            bias, state = self.step(prev[..., k], h[..., k, :], state)
            out.append(bias)
        return torch.stack(out, -2)


class ConfidenceHead(nn.Module):
    """z_k = w . [H_d[k]; W1[x_{k-1}]] + b (pre-token: never sees x_k); c_k = sigmoid(z_k)."""

    def __init__(self, hidden: int, rank: int):
        super().__init__()
        self.proj = nn.Linear(hidden + rank, 1)

    def forward(self, h: torch.Tensor, prev_emb: Optional[torch.Tensor]) -> torch.Tensor:
        x = h if prev_emb is None else torch.cat([h.to(prev_emb.dtype), prev_emb], -1)
        return self.proj(x)[..., 0].float()


def sts_scale(logits: torch.Tensor, temps: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-position temperatures T_k applied to confidence logits [..., G]: ``temps`` the tensor
    :func:`sts_tensor` made once (no host-to-device copy in a step replayed from a CUDA graph),
    None for uncalibrated confidences."""
    return logits if temps is None else logits / temps


def sts_tensor(temps: list, G: int, dtype: torch.dtype, device) -> torch.Tensor:
    """[G] the temperatures T_1..T_G (1 past the list)."""
    t = [float(temps[k]) if k < len(temps) else 1.0 for k in range(G)]
    return torch.tensor(t, dtype=dtype, device=device)

