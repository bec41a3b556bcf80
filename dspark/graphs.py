"""CUDA graphs of the engine's step stages.

A speculative step is a handful of stages (draft, target forward, accept, commit) whose tensors
all live in buffers that persist across steps (the engine's state, the drafter's caches, the
target's KV cache). Run eagerly, the drafter and the bookkeeping are hundreds of small kernel
launches from Python; replayed from CUDA graphs they cost their kernels' time only.

``StageGraphs(key, fn)`` runs ``fn`` eagerly the first time a key is seen (that run warms up
lazily initialised libraries and the caching allocator, and is a real step), captures it the
second time (capture records kernels without running them, so stateful stages are not executed
twice) and replays the capture for that step and every later one. ``fn``'s outputs are then
static tensors, overwritten by each replay. Everything ``fn`` reads must be a tensor that stays
at the same address while the key is in use: the key names the buffers' shapes, and whoever owns
the buffers clears the graphs when they are reallocated.
"""
from __future__ import annotations

from typing import Callable, Hashable

import torch


class StageGraphs:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._graphs: dict = {}  # key -> (graph, outputs)
        self._seen: set = set()

    def clear(self) -> None:
        self._graphs.clear()
        self._seen.clear()

    def __len__(self) -> int:
        return len(self._graphs)

    def __call__(self, key: Hashable, fn: Callable):
        if not self.enabled or torch.cuda.is_current_stream_capturing():
            return fn()
        entry = self._graphs.get(key)
        if entry is None:
            if key not in self._seen:  # first time: a real, eager step
                self._seen.add(key)
                return fn()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # records the kernels; nothing runs yet
                out = fn()
            entry = self._graphs[key] = (graph, out)
        graph, out = entry
        graph.replay()
        return out
