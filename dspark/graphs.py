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

``shared=True`` captures into one memory pool shared by all such graphs: for graphs that are
never in flight together and return nothing (every tensor they allocate is dead once they end;
what they produce lands in persistent buffers), such as the verify of each row bucket of a
scheduled step, memory then grows with the largest of them rather than with their sum.
"""
from __future__ import annotations

from typing import Callable, Hashable

import torch


class StageGraphs:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._graphs: dict = {}  # key -> (graph, outputs)
        self._seen: set = set()
        self._pool = None  # the shared graphs' memory pool
        self.precaptured: set = set()  # whose graphs a caller captured up front (cleared too)

    def clear(self) -> None:
        self._graphs.clear()
        self._seen.clear()
        self._pool = None
        self.precaptured.clear()

    def __len__(self) -> int:
        return len(self._graphs)

    def has(self, key: Hashable) -> bool:
        return key in self._graphs

    def capture(self, key: Hashable, fn: Callable, shared: bool = False) -> bool:
        """Captures ``fn`` under ``key`` now, without running it (capture records kernels only,
        so nothing ``fn`` would change is changed), for a graph whose first use would otherwise
        pay an eager run and a capture in the middle of a generation. The libraries ``fn``
        calls must be warm already (an earlier eager run of a sibling graph). Returns whether
        the key has a graph; a capture that fails is dropped and the key takes the lazy path."""
        if not self.enabled or key in self._graphs or torch.cuda.is_current_stream_capturing():
            return key in self._graphs
        try:
            self._capture(key, fn, shared)
        except Exception:  # noqa: BLE001 - the lazy path still works for this key
            return False
        self._seen.add(key)
        return True

    def _capture(self, key: Hashable, fn: Callable, shared: bool) -> tuple:
        graph = torch.cuda.CUDAGraph()
        if shared and self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool if shared else None):
            out = fn()  # records the kernels; nothing runs yet
        if shared and out is not None:
            raise ValueError(f"a shared-pool graph must return nothing ({key!r})")
        entry = self._graphs[key] = (graph, out)
        return entry

    def __call__(self, key: Hashable, fn: Callable, shared: bool = False):
        if not self.enabled or torch.cuda.is_current_stream_capturing():
            return fn()
        entry = self._graphs.get(key)
        if entry is None:
            if key not in self._seen:  # first time: a real, eager step
                self._seen.add(key)
                return fn()
            entry = self._capture(key, fn, shared)
        graph, out = entry
        graph.replay()
        return out
