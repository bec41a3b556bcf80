"""Layers shared by the target runner, the drafters and the target trainer: RMSNorm, rotary
position embedding (Hugging Face's rotate-half convention) and the gated MLP.

Every model in dspark computes these the same way, with the same dtype roundings, so that a
drafter's context features, a trained target and the runner's forward agree bit for bit with the
modules they were trained or checked against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu,
               "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh")}


class RMSNorm(nn.Module):
    """y = weight * round_to_input_dtype(x * rsqrt(mean(x^2) + eps)), statistics in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dim (the pairing of HF's rotary embedding)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos, sin [B, 1, T, D] (dtype) for positions [B, T]; inv_freq [D/2] fp32."""
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), -1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] rotated by cos/sin broadcastable to it."""
    return x * cos + rotate_half(x) * sin


class MLP(nn.Module):
    """down(act(gate) * up) with gate and up as one [2I, hidden] projection (``gate_up``), the
    layout the fused decode kernels read; HF checkpoints' gate_proj/up_proj are concatenated on
    load (models/loader.py) and split again on save (train/target.py)."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False, act: str = "silu"):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {act!r}; choose one of {sorted(ACTIVATIONS)}")
        self.inter = intermediate
        self.gate_up = nn.Linear(hidden, 2 * intermediate, bias=bias)
        self.down = nn.Linear(intermediate, hidden, bias=bias)
        self.act = ACTIVATIONS[act]

    @classmethod
    def from_config(cls, c) -> "MLP":
        """The MLP of a :class:`~dspark.models.ModelConfig`."""
        return cls(c.hidden_size, c.intermediate_size, c.mlp_bias, c.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.inter, -1)
        return self.down(self.act(gate) * up)
