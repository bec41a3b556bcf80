"""Model configuration from a Hugging Face ``config.json`` (Llama 2/3, Mistral, Qwen2, Qwen3)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # {"rope_type": "llama3" | "linear", ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v (Qwen2 always, Llama optional)
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    hidden_act: str = "silu"
    sliding_window: list = field(default_factory=list)  # per layer: window or None
    eos_token_ids: tuple = ()
    bos_token_id: Optional[int] = None

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        mt = d.get("model_type")
        if mt not in SUPPORTED:
            raise ValueError(f"unsupported model_type {mt!r}; dspark supports {SUPPORTED}")
        heads = d["num_attention_heads"]
        hidden = d["hidden_size"]
        head_dim = d.get("head_dim") or hidden // heads
        rope = dict(d.get("rope_parameters") or {})
        if d.get("rope_scaling"):  # transformers < 5 spelling
            rope.update(d["rope_scaling"])
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        if rope_type not in ("default", "llama3", "linear"):
            raise ValueError(f"unsupported rope_type {rope_type!r} "
                             "(supported: default, llama3, linear)")
        if rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("partial rotary embeddings are not supported")
        n_layers = d["num_hidden_layers"]
        window = d.get("sliding_window")
        if mt == "mistral":
            windows = [window] * n_layers
        else:
            types = d.get("layer_types") or ["full_attention"] * n_layers
            on = d.get("use_sliding_window", True)
            windows = [window if (on and t == "sliding_attention") else None for t in types]
        eos = d.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "gelu", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported hidden_act {act!r}")
        return cls(
            model_type=mt, vocab_size=d["vocab_size"], hidden_size=hidden,
            intermediate_size=d["intermediate_size"], num_layers=n_layers, num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads, head_dim=head_dim,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=theta,
            rope_scaling=None if rope_type == "default" else dict(rope, rope_type=rope_type),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=True if mt == "qwen2" else bool(d.get("attention_bias", False)),
            o_bias=bool(d.get("attention_bias", False)) and mt != "qwen2",
            mlp_bias=bool(d.get("mlp_bias", False)), qk_norm=(mt == "qwen3"), hidden_act=act,
            sliding_window=windows, eos_token_ids=eos, bos_token_id=d.get("bos_token_id"))

    @classmethod
    def from_dir(cls, path: str) -> "ModelConfig":
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise ValueError(f"{path!r} is not a Hugging Face checkpoint dir (no config.json)")
        with open(cfg_path) as f:
            cfg = cls.from_dict(json.load(f))
        gen = os.path.join(path, "generation_config.json")
        if os.path.isfile(gen):
            with open(gen) as f:
                eos = json.load(f).get("eos_token_id")
            if eos is not None:
                cfg.eos_token_ids = tuple(eos) if isinstance(eos, list) else (int(eos),)
        return cfg

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies [head_dim / 2], float32 (HF's formula, Llama 3 scaling)."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        s = self.rope_scaling
        if s is None:
            return inv
        factor = float(s["factor"])
        if s["rope_type"] == "linear":
            return inv / factor
        lo, hi = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
        old = float(s.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return torch.where(medium, smoothed, scaled)
