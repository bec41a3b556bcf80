"""Model configuration from a Hugging Face ``config.json`` (Llama 2/3, Mistral, Qwen2, Qwen3)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
# Sane bounds (inclusive) of the integer fields, by their config.json names: a value outside is
# a typo or a hostile file, refused before anything is sized by it (100000 layers would
# otherwise allocate for minutes). vocab_size: the ops' limit (dspark/common.h kMaxVocab).
BOUNDS = {"vocab_size": (1, (1 << 19) - 1), "hidden_size": (1, 1 << 16),
          "intermediate_size": (1, 1 << 20), "num_hidden_layers": (1, 1024),
          "num_attention_heads": (1, 1024), "num_key_value_heads": (1, 1024),
          "head_dim": (2, 1024), "max_position_embeddings": (1, 1 << 24)}
# ModelConfig field -> its config.json name (for messages about a config a user can edit)
JSON_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
              "num_kv_heads": "num_key_value_heads"}


def _check_int(name: str, value, required: bool = True) -> None:
    if value is None and not required:
        return
    lo, hi = BOUNDS[name]
    if value is None:
        raise ValueError(f"config field {name} is missing")
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"config field {name} must be an integer in [{lo}, {hi}], got "
                         f"{value!r}")


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not 0 < value < math.inf:
        raise ValueError(f"config field {name} must be a positive number, got {value!r}")


def read_json(file: str):
    """The parsed JSON of ``file``; ValueError naming the file when it is not JSON."""
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from None


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

    def check(self) -> "ModelConfig":
        """ValueError naming the (config.json) field that is out of range or inconsistent."""
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "max_position_embeddings"):
            _check_int(JSON_NAMES.get(f, f), getattr(self, f))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"config field num_attention_heads ({self.num_heads}) must be a "
                             f"multiple of num_key_value_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"config field head_dim must be even (rotary pairs), got "
                             f"{self.head_dim}")
        _check_positive("rms_norm_eps", self.rms_norm_eps)
        _check_positive("rope_theta", self.rope_theta)
        if len(self.sliding_window) != self.num_layers:
            raise ValueError(f"config field layer_types has {len(self.sliding_window)} entries "
                             f"for num_hidden_layers {self.num_layers}")
        for w in self.sliding_window:
            if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
                raise ValueError(f"config field sliding_window must be a positive integer, got "
                                 f"{w!r}")
        for t in self.eos_token_ids:
            if isinstance(t, bool) or not isinstance(t, int):
                raise ValueError(f"config field eos_token_id must hold integers, got {t!r}")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a model config is a JSON object, got {type(d).__name__}")
        mt = d.get("model_type")
        if mt not in SUPPORTED:
            raise ValueError(f"unsupported model_type {mt!r}; dspark supports {SUPPORTED}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads"):
            _check_int(name, d.get(name))
        for name in ("num_key_value_heads", "head_dim", "max_position_embeddings"):
            _check_int(name, d.get(name), required=False)
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
            if not isinstance(types, list):
                raise ValueError(f"config field layer_types must be a list, got {types!r}")
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
            sliding_window=windows, eos_token_ids=eos, bos_token_id=d.get("bos_token_id")).check()

    @classmethod
    def from_dir(cls, path: str) -> "ModelConfig":
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise ValueError(f"{path!r} is not a Hugging Face checkpoint dir (no config.json)")
        try:
            cfg = cls.from_dict(read_json(cfg_path))
            gen = os.path.join(path, "generation_config.json")
            eos = read_json(gen).get("eos_token_id") if os.path.isfile(gen) else None
            if eos is not None:
                cfg.eos_token_ids = tuple(eos) if isinstance(eos, list) else (eos,)
                cfg.check()
        except (ValueError, TypeError, KeyError) as exc:  # name the file the user must fix
            msg = str(exc)
            raise ValueError(msg if msg.startswith(path) else f"{cfg_path}: {msg}") from None
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
