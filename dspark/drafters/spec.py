"""What a trained feature-conditioned drafter is: method, block size, taps, mask token, head, STS.

A ``DrafterSpec`` is saved as ``drafter_config.json`` beside the trainable weights
(``model.safetensors``). The target's embedding table and LM head are *not* saved: they are the
target's, frozen, and attached at load time (see :mod:`dspark.drafters.io`).

Conventions (docs/method.md):
- ``target_layer_ids``: tapped target layers (raw residual output of decoder layer l; -1 = the
  embedding output), see :func:`default_taps`.
- ``block_layout``: ``"anchor"`` (DSpark): block ``[x0, MASK x (gamma-1)]`` at positions
  ``p..p+gamma-1``, output slot k (1-based) predicts the token at ``p+k``. ``"mask"`` (original
  DFlash): block ``[x0, MASK x gamma]`` at ``p..p+gamma``, the anchor slot's output is unused and
  mask slot k (at position ``p+k``) predicts the token at its own position ``p+k``. Both predict the
  same tokens; the checkpoints are not interchangeable.
- ``mask_token_id``: see :func:`default_mask_token`.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Optional

from ..models.config import ModelConfig

FORMAT = "dspark-drafter"
VERSION = 1


def default_taps(num_layers: int, n: int = 5) -> list[int]:
    """Tapped target layers. DFlash's rule ``round(1 + i (L - 4) / (n - 1))``, i = 0..n-1 (evenly
    spaced from layer 1 to layer L-3; Qwen3-4B/8B with L = 36 give [1, 9, 17, 25, 33]) when it
    yields n distinct layers. Targets too shallow for that tap ``min(n, L - 1)`` layers evenly
    spaced over 0..L-2; a 1-layer target taps the embedding output (-1). Never the last layer."""
    if num_layers < 1:
        raise ValueError(f"the target needs at least one layer, got {num_layers}")
    if n < 1:
        raise ValueError(f"need n >= 1 tapped layers, got {n}")
    if n > 1:
        rule = [int(round(1 + i * (num_layers - 4) / (n - 1))) for i in range(n)]
        if len(set(rule)) == n and rule[0] >= 0 and rule[-1] <= num_layers - 2:
            return rule
    if num_layers == 1:
        return [-1]
    k = min(n, num_layers - 1)
    if k == 1:
        return [num_layers - 2] if num_layers > 2 else [0]
    return [int(round(i * (num_layers - 2) / (k - 1))) for i in range(k)]


def default_mask_token(vocab_size: int, tokenizer=None, configured: Optional[int] = None) -> int:
    """The block's MASK token id (its embedding is the target's frozen row).

    Rule: an explicitly configured id wins. Otherwise, when the target's embedding has padding
    rows past the tokenizer's vocabulary (special tokens included), the first such id (Qwen3:
    151669; dspark's own trained targets pad their embedding for this). Otherwise the last id,
    ``vocab_size - 1``, with a warning: its (real) embedding then doubles as the mask embedding."""
    if configured is not None:
        if not 0 <= configured < vocab_size:
            raise ValueError(f"mask token {configured} is outside the vocabulary [0, {vocab_size})")
        return int(configured)
    if tokenizer is not None:
        n = tokenizer.get_vocab_size(with_added_tokens=True)
        if n < vocab_size:
            return int(n)
    warnings.warn(f"the target's embedding has no padding rows past its tokenizer: using the last "
                  f"id {vocab_size - 1} as the mask token (pass mask_token_id to choose another)",
                  stacklevel=2)
    return vocab_size - 1


@dataclass
class DrafterSpec:
    method: str  # a registered method (drafters/registry.py): dspark | dflash | eagle3
    gamma: int  # draft tokens per round the drafter was trained for
    target_layer_ids: list
    target: dict  # the target's ModelConfig (asdict): shapes the draft layers copy
    mask_token_id: Optional[int] = None  # parallel backbones only
    num_draft_layers: int = 5
    markov_rank: int = 0  # r of W1 [V, r] / W2 [r, V]; 0 = no sequential head
    head_type: str = "none"  # markov | rnn | none
    confidence_head: bool = False
    block_layout: str = "anchor"  # anchor (DSpark) | mask (original DFlash)
    sts_temperatures: Optional[list] = None  # per-position STS temperatures (confidence head)
    calibration: Optional[dict] = None  # the STS fit: serving temperature, rounds, per-position
    # ECE / AUROC before and after
    training: dict = field(default_factory=dict)  # informational: the training run's settings

    def __post_init__(self):
        from .registry import get_method
        method = get_method(self.method)
        for name, hi in (("gamma", 1024), ("num_draft_layers", 1024), ("markov_rank", 1 << 16)):
            v = getattr(self, name)  # sane bounds: refused before anything is sized by them
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= hi:
                raise ValueError(f"drafter config field {name} must be an integer in [0, {hi}], "
                                 f"got {v!r}")
        if self.gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {self.gamma}")
        if self.head_type not in ("markov", "rnn", "none"):
            raise ValueError(f"unknown head type {self.head_type!r} (markov | rnn | none)")
        if (self.head_type == "none") != (self.markov_rank == 0):
            raise ValueError(f"head_type {self.head_type!r} needs markov_rank "
                             f"{'0' if self.head_type == 'none' else '> 0'}, got "
                             f"{self.markov_rank}")
        if self.block_layout not in ("anchor", "mask"):
            raise ValueError(f"unknown block layout {self.block_layout!r} (anchor | mask)")
        if self.num_draft_layers < 1 or not self.target_layer_ids:
            raise ValueError("need at least one draft layer and one tapped target layer")
        n = self.target["num_layers"]
        for t in self.target_layer_ids:
            if not -1 <= t < n - 1:
                raise ValueError(f"tapped layer {t} is not in [-1, {n - 2}] (the target has {n} "
                                 "layers; its last layer must not be tapped)")
        if method.uses_mask_token:
            if self.mask_token_id is None or not 0 <= self.mask_token_id < self.vocab_size:
                raise ValueError(f"mask token {self.mask_token_id} is not a vocabulary id")

    @property
    def vocab_size(self) -> int:
        return int(self.target["vocab_size"])

    @property
    def hidden_size(self) -> int:
        return int(self.target["hidden_size"])

    def target_config(self) -> ModelConfig:
        d = dict(self.target)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        return ModelConfig(**d).check()

    def draft_config(self) -> ModelConfig:
        """The target's shapes with ``num_draft_layers`` layers, all full attention."""
        c = self.target_config()
        return dataclasses.replace(c, num_layers=self.num_draft_layers,
                                   sliding_window=[None] * self.num_draft_layers).check()

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        return {"format": FORMAT, "version": VERSION, **d}

    @classmethod
    def from_json(cls, d: dict) -> "DrafterSpec":
        if d.get("format") != FORMAT:
            raise ValueError(f"not a dspark drafter config (format {d.get('format')!r})")
        if d.get("version", 0) > VERSION:
            raise ValueError(f"drafter config version {d['version']} is newer than this dspark "
                             f"supports ({VERSION})")
        d = dict(d)
        serving_t = d.pop("sts_serving_temperature", None)  # configs written before 0.1.1
        if serving_t is not None and d.get("calibration"):
            d["calibration"] = {"temperature": serving_t, **d["calibration"]}
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def for_target(cls, target_config: ModelConfig, method: str, gamma: int = 7,
                   target_layer_ids=None, mask_token_id: Optional[int] = None,
                   num_draft_layers: Optional[int] = None, markov_rank: int = 256,
                   head_type: str = "markov", block_layout: Optional[str] = None,
                   num_taps: int = 5) -> "DrafterSpec":
        """A spec from the method's registered defaults (drafters/registry.py): dspark = Markov
        (or RNN) head of rank ``markov_rank`` + confidence head, anchor-slot layout, 5 layers;
        dflash = no sequential head, no confidence head, the original mask-slot layout, 5 layers;
        eagle3 = 1 autoregressive layer. Arguments a method has no use for are ignored."""
        from .registry import get_method
        m = get_method(method)
        fields = dict(m.spec_defaults)
        if m.sequential_head:
            fields["head_type"] = head_type
            fields["markov_rank"] = markov_rank if head_type != "none" else 0
        if num_draft_layers:
            fields["num_draft_layers"] = num_draft_layers
        if m.uses_mask_token:
            fields["block_layout"] = block_layout or fields["block_layout"]
            fields["mask_token_id"] = mask_token_id
        taps = list(target_layer_ids) if target_layer_ids is not None else \
            default_taps(target_config.num_layers, num_taps)
        tgt = dataclasses.asdict(target_config)
        tgt["eos_token_ids"] = list(tgt["eos_token_ids"])
        return cls(method=method, gamma=gamma, target_layer_ids=taps, target=tgt, **fields)
