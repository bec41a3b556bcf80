"""Timing a piece of GPU work the way a decode step runs it: captured once in a CUDA graph and
replayed back to back (no host sync between replays, so launch latency is hidden), with CUDA
events around each replay. Used by the SPS profiler and the benchmarks."""
from __future__ import annotations

import statistics
from typing import Callable, Optional

import torch


def capture_graph(fn: Callable[[], object], warmup: Optional[Callable[[], object]] = None):
    """(graph, what ``fn()`` returned during the capture: the buffers a replay rewrites). First
    ``warmup()`` (default ``fn``; another function for work that mutates its inputs) runs once
    on a side stream, so lazy initialisation and autotuning stay out of the graph. CUDA only."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        (warmup or fn)()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def graph_replay_seconds(fn: Callable[[], object], reps: int, warmup: int = 10,
                         reset: Optional[Callable[[], object]] = None) -> float:
    """Median seconds of one replay of a CUDA graph of ``fn()`` (captured after one warm-up call
    on a side stream: lazy initialisation and autotuning stay out of the graph). ``reset`` runs
    before each timed replay, stream-ordered but outside the timed region (for work that
    mutates its inputs). CUDA only."""
    graph, _ = capture_graph(fn)
    for _ in range(warmup):
        graph.replay()
    marks = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
             for _ in range(reps)]
    for before, after in marks:
        if reset is not None:
            reset()
        before.record()
        graph.replay()
        after.record()
    torch.cuda.synchronize()
    seconds = statistics.median(b.elapsed_time(a) for b, a in marks) / 1e3
    del graph
    return seconds
