"""Load a Hugging Face-format checkpoint directory (config.json, *.safetensors, tokenizer.json)
with ``safetensors`` and ``tokenizers`` only."""
from __future__ import annotations

import glob
import os
from typing import Optional, Union

import torch
from safetensors import safe_open

from .config import ModelConfig, read_json
from .transformer import Transformer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: Union[str, torch.dtype, None], path: Optional[str] = None) -> torch.dtype:
    """A torch dtype from a name; ``None``/"auto" means the checkpoint's dtype (else float32)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        dtype = "float32"
        if path is not None:
            d = read_json(os.path.join(path, "config.json"))
            dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(n, str)
                                                       for n in weight_map.values()):
            raise ValueError(f"{index}: expected a 'weight_map' of tensor name -> file name")
        root = os.path.realpath(path)
        files = []
        for name in sorted(set(weight_map.values())):
            file = os.path.realpath(os.path.join(root, name))
            # an index names shards of this checkpoint, never a file elsewhere on the machine
            if os.path.dirname(file) != root:
                raise ValueError(f"{index}: weight file {name!r} is outside the checkpoint dir")
            if not os.path.isfile(file):
                raise ValueError(f"{index}: weight file {name!r} does not exist")
            files.append(file)
        return files
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors weights in {path!r}")
    return files


class CheckpointError(ValueError):
    """A checkpoint problem whose message already names the file."""


def read_safetensors(file: str, device="cpu", rename=lambda k: k, take=None) -> dict:
    """Tensors of a safetensors file (names mapped by ``rename``; None drops one); ValueError
    naming the file when it is truncated or not safetensors. ``take(name, slice, file)``, if
    given, reads part of each tensor from its safetensors slice instead of the whole (and may
    raise :class:`CheckpointError`)."""
    out = {}
    try:
        with safe_open(file, framework="pt", device=str(device)) as f:
            for key in f.keys():
                new = rename(key)
                if new is not None:
                    out[new] = f.get_tensor(key) if take is None else \
                        take(new, f.get_slice(key), file)
    except CheckpointError:
        raise  # take's own, naming the file
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError)
        if isinstance(exc, MemoryError):
            raise
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{file}: not a readable safetensors file ({msg})") from None
    return out


def check_shapes(expected: dict, got: dict, origin) -> None:
    """ValueError naming the first weight whose shape is not the one the config implies, and
    its file (``origin``: one file name, or a dict weight name -> file)."""
    for name, want in expected.items():
        if name in got and tuple(got[name].shape) != tuple(want.shape):
            file = origin.get(name, "?") if isinstance(origin, dict) else origin
            raise ValueError(f"{file}: weight {name} has shape {list(got[name].shape)}, the "
                             f"config implies {list(want.shape)}")


def _rename(name: str) -> Optional[str]:
    """HF parameter name -> ours (None: drop). q/k/v and gate/up are fused after loading."""
    if name.startswith("model."):
        name = name[len("model."):]
    if "rotary_emb" in name:
        return None
    for old, new in (("embed_tokens.", "embed."), ("input_layernorm.", "attn_norm."),
                     ("post_attention_layernorm.", "mlp_norm."), ("self_attn.o_proj.", "attn.o."),
                     ("self_attn.q_norm.", "attn.q_norm."), ("self_attn.k_norm.", "attn.k_norm."),
                     ("self_attn.", "attn."), ("mlp.down_proj.", "mlp.down.")):
        name = name.replace(old, new)
    return name


def load_state_dict(path: str, dtype: torch.dtype, device, origin: Optional[dict] = None) -> dict:
    """Our parameter name -> tensor; ``origin`` (if given) gets name -> the file it came from."""
    raw, origin = {}, {} if origin is None else origin
    for file in _weight_files(path):
        part = read_safetensors(file, "cpu", _rename)
        origin.update(dict.fromkeys(part, file))
        raw.update(part)
    sd = fuse_projections(raw, path, origin)
    return {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}


def fuse_projections(raw: dict, path: str, origin: dict) -> dict:
    """Renamed tensors -> ours: q/k/v into ``attn.qkv``, gate/up into ``mlp.gate_up`` (rows
    concatenated in that order; a tensor-parallel shard concatenates its own slices)."""
    sd = {}
    for key in list(raw):
        for a, b, c, fused in (("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.qkv"),
                               ("mlp.gate_proj", "mlp.up_proj", None, "mlp.gate_up")):
            if key.endswith(a + ".weight") or key.endswith(a + ".bias"):
                parts = [key.replace(a, p) for p in (a, b, c) if p is not None]
                missing = [p for p in parts if p not in raw]
                if missing:
                    raise ValueError(f"checkpoint {path!r} lacks {missing}")
                shapes = [list(raw[p].shape) for p in parts]
                if len({(len(s), tuple(s[1:])) for s in shapes}) != 1:
                    raise ValueError(f"{origin[key]}: {parts} have shapes {shapes}, which do "
                                     "not stack (the config implies one input size)")
                origin[key.replace(a, fused)] = origin[key]
                sd[key.replace(a, fused)] = torch.cat([raw.pop(p) for p in parts], 0)
    sd.update(raw)
    return sd


def load_model(path: str, device: Union[str, torch.device] = "cpu",
               dtype: Union[str, torch.dtype, None] = None) -> Transformer:
    """Build a :class:`Transformer` from an HF checkpoint directory."""
    config = ModelConfig.from_dir(path)
    dtype = resolve_dtype(dtype, path)
    origin = {}
    sd = load_state_dict(path, dtype, device, origin)
    with torch.device("meta"):
        model = Transformer(config)
    return assign_weights(model, sd, path, device, origin)


def assign_weights(model: Transformer, sd: dict, path: str, device, origin: dict) -> Transformer:
    """Put ``sd`` (ours, fused) into a meta-device ``model``; clear errors for missing,
    unexpected or wrongly shaped weights (``origin``: name -> file; a tied LM head is the
    embedding)."""
    config = model.config
    if "lm_head.weight" not in sd:
        if not config.tie_word_embeddings:
            raise ValueError(f"checkpoint {path!r} has no lm_head.weight and does not tie "
                             "embeddings")
        sd["lm_head.weight"] = sd["embed.weight"]
    expected = set(model.state_dict())
    missing, extra = expected - set(sd), set(sd) - expected
    if missing:
        raise ValueError(f"checkpoint {path!r} lacks weights: {sorted(missing)[:8]}")
    if extra:
        raise ValueError(f"checkpoint {path!r} has unexpected weights: {sorted(extra)[:8]}")
    check_shapes(model.state_dict(), sd, origin)
    model.load_state_dict(sd, assign=True, strict=True)
    model.inv_freq = config.inv_freq().to(device)
    return model.eval().requires_grad_(False)


def load_tokenizer(path: str):
    """The ``tokenizers.Tokenizer`` of a checkpoint dir, or None when it has no tokenizer.json."""
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        return None
    from tokenizers import Tokenizer
    try:
        return Tokenizer.from_file(file)
    except Exception as exc:  # tokenizers raises a bare Exception for a corrupt file
        raise ValueError(f"{file}: not a readable tokenizer ({str(exc)[:200]})") from None
