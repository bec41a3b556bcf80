"""Load one rank's shard of a Hugging Face checkpoint for tensor parallelism.

Each rank opens the safetensors files and reads only its slices of the sharded tensors
(``safe_open(...).get_slice(name)[a:b]`` / ``[:, a:b]``: the bytes of that part, never the whole
tensor), then builds the fused q/k/v and gate/up weights from its own slices. Replicated tensors
(norms, the biases of the row-parallel projections) are read whole. The load runs under
:meth:`TensorParallel.agree`, so a rank that fails (a missing or corrupted file, a bad config)
makes every rank raise with its message instead of leaving the others waiting in a collective.
"""
from __future__ import annotations

from typing import Union

import torch

from ..distributed import TensorParallel
from . import loader
from .config import ModelConfig
from .tp import ShardRanges, TPTransformer, full_shapes


def load_shard_state_dict(path: str, config: ModelConfig, tp: TensorParallel,
                          dtype: torch.dtype, device, origin: dict) -> dict:
    """This rank's tensors of checkpoint ``path`` (ours, fused), on ``device`` in ``dtype``;
    ``origin`` gets name -> the file it came from."""
    ranges = ShardRanges.of(config, tp)
    full = full_shapes(config)

    def take(name, part, file):
        # the whole tensor's shape first: a slice of a wrongly shaped tensor can look right
        want, got = full.get(name), list(part.get_shape())
        if want is not None and got != list(want):
            raise loader.CheckpointError(f"{file}: weight {name} has shape {got}, the config "
                                         f"implies {list(want)}")
        return ranges.take(name, part).to(device=device, dtype=dtype)

    raw = {}
    for file in loader._weight_files(path):
        part = loader.read_safetensors(file, "cpu", loader._rename, take)
        origin.update(dict.fromkeys(part, file))
        raw.update(part)
    return loader.fuse_projections(raw, path, origin)


def load_model_tp(path: str, tp: TensorParallel, device: Union[str, torch.device] = "cpu",
                  dtype: Union[str, torch.dtype, None] = None) -> TPTransformer:
    """This rank's :class:`TPTransformer` shard of the checkpoint dir ``path``. Every rank of
    ``tp`` must call it (with the same path and dtype: checked); a failure on any rank raises
    :class:`dspark.distributed.DistributedError` on all of them."""

    def load():
        config = ModelConfig.from_dir(path)
        dt = loader.resolve_dtype(dtype, path)
        with torch.device("meta"):
            model = TPTransformer(config, tp)  # checks the heads / intermediate divisibility
        origin = {}
        sd = load_shard_state_dict(path, config, tp, dt, device, origin)
        return loader.assign_weights(model, sd, path, device, origin)

    model = tp.agree(load, f"loading the tensor-parallel shards of {path!r}")
    tp.same_everywhere((repr(model.config), str(model.dtype)), "the model (config, dtype)")
    return model
