"""Build, save and load feature-conditioned drafters (DSpark, DFlash, EAGLE-3).

A drafter directory holds ``drafter_config.json`` (a :class:`DrafterSpec`: method, gamma, taps,
mask token, head, the target's shapes, STS temperatures) and ``model.safetensors`` (the trainable
weights only; the embedding table and LM head are the target's and are attached on load).
"""
from __future__ import annotations

import json
import os
from typing import Optional, Union

import torch

from .dspark_drafter import ParallelDrafter, ParallelDraftModel
from .eagle3 import Eagle3Drafter, Eagle3Model
from .spec import DrafterSpec

CONFIG_NAME = "drafter_config.json"
WEIGHTS_NAME = "model.safetensors"

DraftModel = Union[ParallelDraftModel, Eagle3Model]


def build_draft_model(spec: DrafterSpec, target=None) -> DraftModel:
    """A freshly initialized draft model for ``spec`` (attached to ``target`` if given)."""
    model = Eagle3Model(spec) if spec.method == "eagle3" else ParallelDraftModel(spec)
    if target is not None:
        model.to(target.device)
        model.attach_target(target)
    return model


def make_drafter(model: DraftModel, gamma: Optional[int] = None):
    """The engine-facing :class:`~dspark.drafters.Drafter` for a draft model."""
    if isinstance(model, Eagle3Model):
        return Eagle3Drafter(model, gamma)
    return ParallelDrafter(model, gamma)


def save_drafter(model: DraftModel, path: str) -> None:
    """Write ``drafter_config.json`` + ``model.safetensors`` (fp32 unless the model is not)."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = os.path.join(path, WEIGHTS_NAME + ".tmp")
    save_file(sd, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(path, WEIGHTS_NAME))
    with open(os.path.join(path, CONFIG_NAME + ".tmp"), "w") as f:
        json.dump(model.spec.to_json(), f, indent=1)
    os.replace(os.path.join(path, CONFIG_NAME + ".tmp"), os.path.join(path, CONFIG_NAME))


def load_spec(path: str) -> DrafterSpec:
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise ValueError(f"{path!r} is not a dspark drafter dir (no {CONFIG_NAME})")
    with open(file) as f:
        return DrafterSpec.from_json(json.load(f))


def check_target(spec: DrafterSpec, target_config) -> None:
    """Clear ValueError when ``spec`` was trained for another target."""
    want = spec.target
    got = target_config
    diffs = [f"{name} {want[key]} (this target: {getattr(got, key)})"
             for name, key in (("hidden size", "hidden_size"), ("vocab size", "vocab_size"),
                               ("layers", "num_layers"))
             if int(want[key]) != int(getattr(got, key))]
    if diffs:
        raise ValueError("this drafter was trained for a different target: it expects "
                         + ", ".join(diffs))


def load_draft_model(path: str, target, dtype: Optional[torch.dtype] = None) -> DraftModel:
    """Load a draft model for ``target`` (a dspark Transformer); ValueError if it was trained
    for a target with a different hidden size, vocabulary or depth."""
    from safetensors.torch import load_file
    spec = load_spec(path)
    check_target(spec, target.config)
    with torch.device("meta"):
        model = Eagle3Model(spec) if spec.method == "eagle3" else ParallelDraftModel(spec)
    file = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(file):
        raise ValueError(f"{path!r} has no {WEIGHTS_NAME}")
    sd = load_file(file, device=str(target.device))
    dtype = dtype or target.dtype
    sd = {k: v.to(dtype) for k, v in sd.items()}
    missing = set(model.state_dict()) - set(sd)
    extra = set(sd) - set(model.state_dict())
    if missing or extra:
        raise ValueError(f"drafter weights in {path!r} do not match its config: missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
    model.load_state_dict(sd, assign=True, strict=True)
    model.inv_freq = spec.draft_config().inv_freq().to(target.device)
    model.attach_target(target)
    return model.eval().requires_grad_(False)


def load_drafter(path: str, target, gamma: Optional[int] = None,
                 dtype: Optional[torch.dtype] = None):
    """The engine drafter saved in ``path`` for ``target`` (dspark Transformer or ModelRunner)."""
    target = getattr(target, "model", target)
    return make_drafter(load_draft_model(path, target, dtype), gamma)
