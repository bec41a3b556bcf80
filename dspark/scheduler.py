"""Confidence-scheduled verification, host side: the steps-per-second table SPS(B) that the
prefix scheduler (:func:`dspark.ops.schedule_prefix`) trades expected tokens against
(docs/method.md, "Scheduling").

SPS(B) is how many verify forwards of the target per second this machine runs when the forward
holds B tokens in all. :func:`profile_sps` measures it for B = 1..max_tokens with the runner's
own ``forward_tree`` (replayed from a CUDA graph on GPU, eager calls on CPU) over B tokens in
``ceil(B / (gamma + 1))`` chains of near-equal length at a fixed context: what a packed verify
of B tokens costs. It measures a grid of B (every B up to 64 on GPU, coarser above; a coarse
grid on CPU, where eager forwards are slow) and interpolates the step *time* between grid points
(``interpolate="linear"``, or ``"step"``: the next measured size's time, as for a verify padded
to a captured graph size). With ``monotone=True`` (default) the time of B is the least time of
any size >= B: a B-token verify can always run in a larger one's shape, so measurement noise
never makes a larger step look faster than a smaller one.

Tables are cached as JSON keyed by model architecture (speed does not depend on the weights) +
device + dtype + the runner's kernel variant, under ``~/.cache/dspark/sps`` (or
``$DSPARK_SPS_CACHE``, or a given dir). Engines call::

    table = load_sps(runner, max_tokens, profile=True)    # cached, or measured once now
    lengths = dspark.ops.schedule_prefix(conf, draft_lengths, table.tensor(device), "sync")

``dspark profile-sps --target DIR`` does the same from the command line and plots the table.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from typing import Optional, Sequence, Union

import torch

from . import ops
from .models.transformer import FUSED_MAX_ROWS
from .timing import graph_replay_seconds

SPS_FORMAT = 1


@dataclasses.dataclass
class SPSTable:
    """Steps per second of a B-token verify forward, B = 1..max_tokens (``sps[B - 1]``)."""
    sps: list  # float steps/s for every B
    grid: list  # the B actually measured
    grid_seconds: list  # median seconds per forward at each grid B (before monotone/interp)
    key: dict  # model, config, device, dtype, variant: what the cache file is named after
    config: dict = dataclasses.field(default_factory=dict)  # how it was measured

    @property
    def max_tokens(self) -> int:
        return len(self.sps)

    def tensor(self, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        """[max_tokens] float32: the ``sps`` argument of dspark.ops.schedule_prefix."""
        return torch.tensor(self.sps, dtype=torch.float32, device=device)

    def to_dict(self) -> dict:
        return dict(format=SPS_FORMAT, **dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "SPSTable":
        if d.get("format") != SPS_FORMAT:
            raise ValueError(f"unsupported SPS table format {d.get('format')!r}")
        t = cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})
        if not t.sps or not all(math.isfinite(s) and s > 0 for s in t.sps):
            raise ValueError("an SPS table needs at least one entry, all finite and > 0")
        return t

    def save(self, path: str) -> str:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        os.replace(tmp, path)  # readers never see half a file
        return path


# ---- cache keys ----------------------------------------------------------------------------------
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}-{platform.machine()}-{torch.get_num_threads()}threads"


def sps_key(runner) -> dict:
    """What an SPS table depends on: the architecture (a hash of the model config), the device,
    the dtype and the runner's kernel variant (fused / batch-invariant / hybrid / compiled)."""
    cfg = dataclasses.asdict(runner.config)
    digest = hashlib.sha1(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()
    variant = "fused" if runner.fused else "unfused"
    if runner.fused and not runner.batch_invariant and runner.fused_max_rows != FUSED_MAX_ROWS:
        variant += f"-max{runner.fused_max_rows}"
    if runner.batch_invariant:
        variant += "-batch-invariant"
    elif getattr(runner, "hybrid", False):
        variant += "-hybrid"  # above the fused rows: decode_attention under cuBLAS projections
    if runner.compile:
        variant += f"-compile-{runner.compile}" if isinstance(runner.compile, str) else "-compile"
    return dict(model=f"{cfg['model_type']}-{cfg['hidden_size']}x{cfg['num_layers']}",
                config=digest[:12], device=_device_name(runner.device),
                dtype=str(runner.model.dtype).replace("torch.", ""), variant=variant)


def sps_cache_dir(cache_dir: Optional[str] = None) -> str:
    """cache_dir, else $DSPARK_SPS_CACHE, else ~/.cache/dspark/sps."""
    return cache_dir or os.environ.get("DSPARK_SPS_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "dspark", "sps")


def sps_cache_path(key: dict, cache_dir: Optional[str] = None) -> str:
    parts = [f"{key['model']}-{key['config']}", key["device"], key["dtype"], key["variant"]]
    name = "__".join(re.sub(r"[^A-Za-z0-9.+-]+", "-", p).strip("-") for p in parts)
    return os.path.join(sps_cache_dir(cache_dir), name + ".json")


# ---- measuring -----------------------------------------------------------------------------------
def default_grid(max_tokens: int, device_type: str) -> list:
    """The B to measure: on GPU every B up to 64, then every 8 up to 512, then every 32; on CPU
    (slow eager forwards) 1, 2, 3, 4, 6, 8, 12, 16, ... (two per octave). Always max_tokens."""
    if device_type == "cuda":
        grid = list(range(1, 65)) + list(range(72, 513, 8)) + list(range(544, max_tokens + 1, 32))
    else:
        grid, b = [1, 2, 3], 4
        while b <= max_tokens:
            grid += [b, b * 3 // 2]
            b *= 2
    return sorted({b for b in grid if b <= max_tokens} | {max_tokens})


def verify_layout(B: int, gamma: int, requests: Optional[int] = None) -> list:
    """Nodes per request of a B-token verify: R = ceil(B / (gamma + 1)) chains (or
    ``min(requests, B)`` if that is more), lengths as equal as possible (each <= gamma + 1)."""
    R = -(-B // (gamma + 1))
    if requests is not None:
        R = max(R, min(requests, B))
    return [B // R + (1 if r < B % R else 0) for r in range(R)]


def _median_seconds(fn, device: torch.device, reps: int, warmup: int) -> float:
    if device.type != "cuda":  # eager calls, timed on the host
        for _ in range(warmup):
            fn()
        return statistics.median(_host_seconds(fn) for _ in range(reps))
    return graph_replay_seconds(fn, reps, warmup)


def _host_seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_verify_seconds(runner, B: int, *, gamma: int = 7, context: int = 512,
                           requests: Optional[int] = None, reps: int = 20, warmup: int = 3,
                           taps: Sequence[int] = ()) -> float:
    """Median seconds of one ``runner.forward_tree`` over B tokens (:func:`verify_layout`), every
    request's block at cache slot ``context``. (Re)allocates the runner's KV cache to
    R rows of ``context + max_nodes`` slots."""
    counts = verify_layout(B, gamma, requests)
    R, W, dev = len(counts), max(counts), runner.device
    if context + W > runner.config.max_position_embeddings:
        raise ValueError(f"context {context} + {W} verify slots exceeds the model's "
                         f"{runner.config.max_position_embeddings} positions")
    runner.allocate(R, context + W)
    offsets, parents = ops.chain_layout([n - 1 for n in counts], device=dev)
    gen = torch.Generator().manual_seed(B)
    tokens = torch.randint(0, runner.vocab_size, (B,), generator=gen).to(dev)
    start = torch.full((R,), context, dtype=torch.int64, device=dev)
    graphs = runner.use_cuda_graphs
    runner.use_cuda_graphs = False  # the runner would keep a graph per size: we capture our own
    try:
        return _median_seconds(lambda: runner.forward_tree(tokens, parents, offsets, start, W,
                                                           taps), dev, reps, warmup)
    finally:
        runner.use_cuda_graphs = graphs


def table_from_measurements(grid: Sequence[int], seconds: Sequence[float], max_tokens: int,
                            interpolate: str = "linear", monotone: bool = True) -> list:
    """SPS(B) for B = 1..max_tokens from step times measured at ``grid`` (which must include
    max_tokens): optionally made monotone (time(B) = min over measured B' >= B), then linear in
    time between grid points ("linear") or the next grid point's time ("step"); below the first
    grid point, its time."""
    if interpolate not in ("linear", "step"):
        raise ValueError(f"interpolate must be 'linear' or 'step', got {interpolate!r}")
    pts = sorted(zip(grid, seconds))
    if not pts or pts[-1][0] != max_tokens or any(s <= 0 for _, s in pts):
        raise ValueError("need positive times measured up to max_tokens")
    bs, ts = [b for b, _ in pts], [s for _, s in pts]
    if monotone:
        for i in range(len(ts) - 2, -1, -1):
            ts[i] = min(ts[i], ts[i + 1])
    out, k = [], 0
    for B in range(1, max_tokens + 1):
        while bs[k] < B:
            k += 1
        if bs[k] == B or k == 0 or interpolate == "step":
            t = ts[k]
        else:
            w = (B - bs[k - 1]) / (bs[k] - bs[k - 1])
            t = ts[k - 1] + w * (ts[k] - ts[k - 1])
        out.append(1.0 / t)
    return out


def ranking_table(sps: Sequence[float]) -> list:
    """The SPS table the scheduler ranks with: step *time* made linear between the last sizes of
    its constant runs. A bucketed engine's table is a step function (a verify padded to the next
    captured size costs that size's time), so the first draft past a bucket edge looks like it
    costs the whole jump, and Algorithm 1's early stop ends admission there, however cheap the
    rest of the next bucket is: on the benchmark pair (H100, 2026-12-06) sync verified 0.27
    drafts a request at batch 128 where the table's time grows 1.8 % from 128 to 255 tokens,
    and fixed gamma 7 beat it 1.8x. Spread over its bucket, a jump is the marginal cost of a
    token there. The table is fixed before the drafts exist, so the output stays exact. A table
    with no constant runs (strictly increasing time) is returned as it is."""
    t = [1.0 / float(s) for s in sps]
    n = len(t)
    ends = [i for i in range(n) if i == n - 1 or t[i + 1] != t[i]]  # last index of each run
    out, k = [], 0
    for i in range(n):
        while ends[k] < i:
            k += 1
        if k == 0 or i == ends[k]:
            ti = t[ends[k]]
        else:
            lo, hi = ends[k - 1], ends[k]
            ti = t[lo] + (i - lo) / (hi - lo) * (t[hi] - t[lo])
        out.append(1.0 / ti)
    return out


def profile_sps(runner, max_tokens: int, *, gamma: int = 7, context: int = 512,
                requests: Optional[int] = None, grid: Optional[Sequence[int]] = None,
                reps: Optional[int] = None, warmup: Optional[int] = None,
                interpolate: str = "linear", monotone: bool = True, taps: Sequence[int] = (),
                cache_dir: Optional[str] = None, save: bool = True,
                progress: bool = False) -> SPSTable:
    """Measure SPS(B) for B = 1..max_tokens on this machine (see the module docstring) and, with
    ``save``, write it to :func:`sps_cache_path`. ``grid``: the B to measure (default
    :func:`default_grid`; max_tokens is always added); ``reps``/``warmup``: timed and untimed
    forwards per size (default 20/3 on GPU, 3/1 on CPU). The runner's KV cache is reallocated."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    dev = runner.device
    cuda = dev.type == "cuda"
    reps = reps or (20 if cuda else 3)
    warmup = (3 if cuda else 1) if warmup is None else warmup
    points = sorted({int(b) for b in (grid or default_grid(max_tokens, dev.type))
                     if 1 <= b <= max_tokens} | {max_tokens})
    kw = dict(gamma=gamma, context=context, requests=requests, taps=taps)
    measure_verify_seconds(runner, points[0], reps=1, warmup=warmup, **kw)  # first-call costs
    seconds = []
    for i, B in enumerate(points):
        seconds.append(measure_verify_seconds(runner, B, reps=reps, warmup=warmup, **kw))
        if progress:
            print(f"\rprofile-sps: B = {B} ({i + 1}/{len(points)}): {seconds[-1] * 1e3:.3f} ms",
                  end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    if cuda:
        torch.cuda.empty_cache()
    table = SPSTable(sps=table_from_measurements(points, seconds, max_tokens, interpolate,
                                                 monotone),
                     grid=points, grid_seconds=seconds, key=sps_key(runner),
                     config=dict(gamma=gamma, context=context, requests=requests, reps=reps,
                                 warmup=warmup, interpolate=interpolate, monotone=monotone,
                                 taps=list(taps), torch=torch.__version__,
                                 date=time.strftime("%Y-%m-%d %H:%M:%S")))
    if save:
        table.save(sps_cache_path(table.key, cache_dir))
    return table


def load_sps(source, max_tokens: Optional[int] = None, *, cache_dir: Optional[str] = None,
             profile: bool = False, **profile_kw) -> Optional[SPSTable]:
    """The SPS table of ``source``: a JSON file path, or a runner (its cached table, found by
    :func:`sps_key`). With ``max_tokens``, a cached table must cover B = 1..max_tokens. A
    runner without a usable table gets one measured now (:func:`profile_sps` with
    ``profile_kw``, then cached) if ``profile``, else None. A path must exist."""
    if isinstance(source, (str, os.PathLike)):
        with open(source) as f:
            table = SPSTable.from_dict(json.load(f))
        if max_tokens is not None and table.max_tokens < max_tokens:
            raise ValueError(f"{source}: the table covers B <= {table.max_tokens}, "
                             f"{max_tokens} needed")
        return table
    path = sps_cache_path(sps_key(source), cache_dir)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                table = SPSTable.from_dict(json.load(f))
            if max_tokens is None or table.max_tokens >= max_tokens:
                return table
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            pass  # unreadable: measure again (if asked)
    if not profile:
        return None
    if max_tokens is None:
        raise ValueError("profiling a new SPS table needs max_tokens")
    return profile_sps(source, max_tokens, cache_dir=cache_dir, **profile_kw)


def plot_sps(table: SPSTable, path: str) -> str:
    """PNG of the table: SPS(B) with the measured points; B * SPS(B), the verify tokens/s (what
    Theta would be if every token were accepted); and SPS(B) / SPS(B + 1) - 1, the share of the
    expected tokens tau that one more draft must add to raise Theta (Algorithm 1 admits a draft
    of survival a at B + 1 iff a > tau * (SPS(B) / SPS(B + 1) - 1))."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    B = list(range(1, table.max_tokens + 1))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    ax.plot(B, table.sps, lw=1, label="table")
    ax.plot(table.grid, [1 / s for s in table.grid_seconds], ".", ms=3, label="measured")
    ax.set(xlabel="B (verify tokens)", ylabel="steps / s", title="SPS(B)")
    ax.legend()
    axes[1].plot(B, [b * s for b, s in zip(B, table.sps)], lw=1)
    axes[1].set(xlabel="B", ylabel="tokens / s", title="B * SPS(B): verify tokens per second")
    cost = [table.sps[i] / table.sps[i + 1] - 1 for i in range(table.max_tokens - 1)]
    axes[2].plot(B[:-1], cost, lw=1)
    axes[2].set(xlabel="B", ylabel="a / tau", title="break-even survival of draft B + 1, / tau")
    k = table.key
    fig.suptitle(f"{k['model']} ({k['config']}) {k['dtype']} {k['variant']} on {k['device']}, "
                 f"context {table.config.get('context')}, gamma {table.config.get('gamma')}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def split_fallback(spec: str) -> tuple:
    """``"MODE+ar"`` (a bench schedule) -> ("MODE", True): MODE with the engine's ar_fallback
    (plain decoding where it measures faster, dspark/fallback.py); ``"MODE"`` -> ("MODE", False)."""
    return (spec[:-3], True) if spec.endswith("+ar") else (spec, False)


def parse_schedule(spec: str) -> tuple:
    """``"sync" | "async" | "fixed" | "threshold:X"`` -> (mode, threshold), as
    dspark.ops.schedule_prefix takes them (a command line's ``--schedule``)."""
    mode, _, arg = spec.partition(":")
    if mode == "threshold":
        try:
            x = float(arg)
        except ValueError:
            x = float("nan")
        if not 0.0 <= x <= 1.0:
            raise ValueError(f"threshold schedule needs a value in [0, 1]: 'threshold:0.7', "
                             f"got {spec!r}")
        return mode, x
    if mode not in ops.SCHEDULE_MODES or arg:
        raise ValueError(f"schedule must be sync, async, fixed or threshold:X, got {spec!r}")
    return mode, 0.0
