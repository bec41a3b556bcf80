"""Where the fused decode / verify kernels stop paying: the runner's ``fused_max_rows="auto"``.

A forward over up to ``fused_max_rows`` token rows runs on dspark's kernels (fused_linear +
decode_attention: one summation order for every row count, so greedy speculation is bit-identical
to greedy decoding); above it cuBLAS takes over (its projections around decode_attention with the
runner's ``hybrid``, else cuBLAS + SDPA: "cublas" below and in the JSON). Where it takes over
faster depends on the model and the GPU (H100, bench/RESULTS.md): the Qwen3-8B shape's verify
forward is faster on cuBLAS + SDPA from 16 rows, while the 24 x 256 benchmark pair's fused forward
stays faster up to ~320 rows (2026-12-06 s13: 95 rows 2.41 vs 3.86 ms, 255 rows 3.73 vs 4.00, 319
rows 4.11 vs 4.29, 383 rows 4.90 vs 4.32). A fixed default (64) left the pair's batch-16 verify
(128 rows) on the slower path, which also broke greedy identity there (66 % of outputs identical).

:func:`measure_crossover` times the runner's verify forward (the SPS profiler's shapes: B tokens
in chains of gamma + 1 at a fixed context, replayed from a CUDA graph) on both paths over a grid
of B and returns the largest B up to which the fused path was never slower: the crossover.
:func:`resolve_fused_max_rows` caches it as JSON beside the SPS tables (model architecture +
device + dtype: the weights do not change speed) and measures it once where none is cached.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

from .scheduler import measure_verify_seconds, sps_cache_dir, sps_key

CROSSOVER_FORMAT = 1
# B measured on each path: the rows a verify of 1-128 requests of 8 tokens takes, and between
CROSSOVER_GRID = (8, 16, 32, 64, 96, 128, 192, 256, 320, 384, 512, 768, 1024)


def measure_crossover(runner, grid: Sequence[int] = CROSSOVER_GRID, *, gamma: int = 7,
                      context: int = 512, reps: int = 10) -> dict:
    """Median seconds of a B-token verify forward on the fused kernels and on cuBLAS + SDPA at
    each grid B, and ``max_rows``: the largest grid B such that the fused path was no slower at
    it and at every smaller grid B (the smallest grid B if it lost there). Leaves the runner's
    fused settings as they were and its KV cache released."""
    if not runner.model.fusable():
        raise ValueError("the fused kernels cannot run this model (a SiLU-gated MLP is needed)")
    grid = sorted({int(b) for b in grid})
    if not grid or grid[0] < 1:
        raise ValueError(f"a crossover grid needs token counts >= 1, got {list(grid)}")
    fused, max_rows, invariant = runner.fused, runner.fused_max_rows, runner.batch_invariant
    times = {"fused": [], "cublas": []}
    try:
        runner.batch_invariant = False
        for path in times:
            runner.fused = path == "fused"
            runner.fused_max_rows = max(grid)
            for B in grid:
                times[path].append(measure_verify_seconds(runner, B, gamma=gamma,
                                                          context=context, reps=reps))
    finally:
        runner.fused, runner.fused_max_rows, runner.batch_invariant = fused, max_rows, invariant
        runner.release()  # the measurement's cache: the engine allocates its own
    crossover = grid[0]
    for B, tf, tc in zip(grid, times["fused"], times["cublas"]):
        if tf > tc:
            break
        crossover = B
    return dict(format=CROSSOVER_FORMAT, grid=grid, fused_seconds=times["fused"],
                cublas_seconds=times["cublas"], max_rows=crossover,
                above="hybrid" if getattr(runner, "hybrid", False) else "cublas",
                config=dict(gamma=gamma, context=context, reps=reps))


def crossover_path(runner, cache_dir: Optional[str] = None) -> str:
    """The cache file of this runner's model architecture, device and dtype."""
    key = sps_key(runner)
    name = "__".join([f"{key['model']}-{key['config']}", key["device"], key["dtype"],
                      "crossover"])
    safe = "".join(c if c.isalnum() or c in ".+-_" else "-" for c in name)
    return os.path.join(sps_cache_dir(cache_dir), safe + ".json")


def resolve_fused_max_rows(runner, cache_dir: Optional[str] = None, measure=None,
                           log=None) -> int:
    """The cached crossover of this runner's model, device and dtype, or measured now (and
    cached). ``measure``: the measurement (default :func:`measure_crossover`); ``log``: a
    callable told when a measurement starts (it takes seconds)."""
    path = crossover_path(runner, cache_dir)
    if os.path.exists(path):
        with open(path) as f:
            found = json.load(f)
        if found.get("format") != CROSSOVER_FORMAT or not isinstance(found.get("max_rows"), int) \
                or found["max_rows"] < 1:
            raise ValueError(f"{path}: not a fused-kernel crossover file (delete it to measure "
                             f"again)")
        return found["max_rows"]
    if log is not None:
        log(f"measuring where the fused kernels stop paying (once; cached in {path})")
    result = (measure or measure_crossover)(runner)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)  # readers never see half a file
    return result["max_rows"]
