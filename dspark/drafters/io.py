"""Build, save and load drafters.

A trained drafter directory holds ``drafter_config.json`` (a :class:`DrafterSpec`: method, gamma,
taps, mask token, head, the target's shapes, STS temperatures) and ``model.safetensors`` (the
trainable weights only; the embedding table and LM head are the target's and are attached on
load). :func:`load_drafter` also takes a Hugging Face causal-LM checkpoint dir (``config.json``),
which becomes a draft-model drafter: one way to load any drafter from a directory.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Union

import torch

from ..models.config import read_json
from .dspark_drafter import ParallelDraftModel
from .eagle3 import Eagle3Model
from .registry import get_method
from .spec import DrafterSpec

CONFIG_NAME = "drafter_config.json"
WEIGHTS_NAME = "model.safetensors"

DraftModel = Union[ParallelDraftModel, Eagle3Model]


def build_draft_model(spec: DrafterSpec, target=None) -> DraftModel:
    """A freshly initialized draft model for ``spec`` (attached to ``target`` if given)."""
    model = get_method(spec.method).model_class(spec)
    if target is not None:
        model.to(target.device)
        model.attach_target(target)
    return model


def make_drafter(model: DraftModel, gamma: Optional[int] = None):
    """The engine-facing :class:`~dspark.drafters.Drafter` for a trained draft model."""
    return get_method(model.spec.method).drafter_class(model, gamma)


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
    try:
        spec = DrafterSpec.from_json(read_json(file))
        spec.target_config()  # validated before anything is built from it
        return spec
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # name the file to fix
        raise ValueError(f"{file}: {exc}") from None


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
    from ..models.loader import check_shapes, read_safetensors
    spec = load_spec(path)
    check_target(spec, target.config)
    with torch.device("meta"):
        model = get_method(spec.method).model_class(spec)
    file = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(file):
        raise ValueError(f"{path!r} has no {WEIGHTS_NAME}")
    sd = read_safetensors(file, target.device)
    dtype = dtype or target.dtype
    sd = {k: v.to(dtype) for k, v in sd.items()}
    missing = set(model.state_dict()) - set(sd)
    extra = set(sd) - set(model.state_dict())
    if missing or extra:
        raise ValueError(f"drafter weights in {path!r} do not match its config: missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
    check_shapes(model.state_dict(), sd, file)
    model.load_state_dict(sd, assign=True, strict=True)
    model.inv_freq = spec.draft_config().inv_freq().to(target.device)
    model.attach_target(target)
    return model.eval().requires_grad_(False)


def drafter_kind(path: str) -> str:
    """``"trained"`` (a dspark drafter dir) or ``"lm"`` (an HF causal-LM checkpoint dir)."""
    if not os.path.isdir(path):
        raise ValueError(f"drafter {path!r} is not a directory")
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return "trained"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "lm"
    raise ValueError(f"{path!r} is neither a dspark drafter dir ({CONFIG_NAME}) nor a model "
                     "checkpoint dir (config.json)")


def load_drafter(path: str, target, gamma: Optional[int] = None,
                 dtype: Optional[torch.dtype] = None, tree_topk: int = 1):
    """The engine drafter stored in ``path`` for ``target`` (dspark Transformer or ModelRunner):
    a trained DSpark / DFlash / EAGLE-3 drafter (``drafter_config.json``; gamma defaults to the
    trained block size) or an HF causal LM with the target's tokenizer, run as a draft model
    (gamma defaults to 4; ``tree_topk`` > 1 drafts top-k trees)."""
    from .draft_model import DraftModelDrafter
    target = getattr(target, "model", target)
    if drafter_kind(path) == "lm":
        from ..models import load_model
        lm = load_model(path, target.device, dtype or target.dtype)
        return DraftModelDrafter(lm, 4 if gamma is None else gamma, tree_topk)
    if tree_topk != 1:
        raise ValueError(f"tree_topk {tree_topk}: trees are drafted by draft LMs only; "
                         f"{path!r} holds a trained chain drafter")
    return make_drafter(load_draft_model(path, target, dtype), gamma)
