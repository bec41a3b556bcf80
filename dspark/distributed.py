"""Tensor-parallel process groups on torch.distributed (NCCL on GPUs, gloo on CPU; ``torchrun``).

:class:`TensorParallel` is the one object the sharded model (``dspark.models.tp``) talks to: the
rank, the world size and the three collectives a Megatron-style forward needs — the reduce after
a row-parallel projection, the all-gather of vocab-sliced logits and the agreement after a step
that may fail on one rank only (loading a shard).

Reductions: ``reduce="gather"`` (the default) all-gathers the per-rank partial sums and adds
them in rank order on every rank (in the model dtype, rounding like an all-reduce). So the
result is bit-identical on every rank *and* independent of how many rows the call has (a ring
or tree all-reduce splits the buffer into chunks whose reduction order depends on the buffer
size, so a token's row could round differently in a 1-row decode and a 5-row verify with 4+
ranks). It moves (world - 1) x the partials per rank, against 2 (world - 1) / world x for a ring
all-reduce: the same at 2 ranks, 1.5x at 4. ``reduce="allreduce"`` is NCCL's / gloo's
all-reduce (ranks still agree with each other; decode and verify rows may differ in the last
bit at 4+ ranks).
"""
from __future__ import annotations

import datetime
import os
from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as dist

REDUCE_MODES = ("gather", "allreduce")
# NVLink multicast stays off in NCCL, PyTorch's symmetric memory and NVSHMEM: on shared
# multi-GPU hosts a program using it can take the host's GPUs out of service, and dspark's
# collectives are small (latency-bound) anyway. Set before the first communicator exists.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}
DEFAULT_TIMEOUT_S = 600  # collectives (and the load agreement) give up after this long
T = TypeVar("T")


class DistributedError(RuntimeError):
    """Raised on every rank when some rank failed (each rank gets the failing rank's message)."""


def _gather_single(out: torch.Tensor, x: torch.Tensor, group) -> None:
    # all_gather_single is the name from torch 2.14 on (all_gather_into_tensor is deprecated there)
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, x, group=group)


class TensorParallel:
    """A tensor-parallel group: ``world`` ranks each holding 1/world of every sharded weight."""

    def __init__(self, group=None, reduce: str = "gather"):
        if not dist.is_initialized():
            raise ValueError("tensor parallelism needs torch.distributed initialized "
                             "(dspark.distributed.init_from_env(), under torchrun)")
        if reduce not in REDUCE_MODES:
            raise ValueError(f"reduce must be one of {REDUCE_MODES}, got {reduce!r}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.reduce_mode = reduce

    def __repr__(self) -> str:
        return f"TensorParallel(rank={self.rank}, world={self.world}, reduce={self.reduce_mode!r})"

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints and writes files."""
        return self.rank == 0

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[world, *x.shape]: every rank's ``x`` in rank order (identical on every rank)."""
        x = x.contiguous()
        out = torch.empty((self.world * x.shape[0],) + x.shape[1:], dtype=x.dtype, device=x.device)
        _gather_single(out, x, self.group)
        return out.view((self.world,) + x.shape)

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``partial`` (in its dtype), identical on every rank. Callers
        fold a bias or a residual into rank 0's partial only, so it is added once."""
        if self.reduce_mode == "allreduce":
            out = partial.contiguous()
            dist.all_reduce(out, group=self.group)
            return out
        parts = self.gather(partial)
        total = parts[0]
        for r in range(1, self.world):  # rank order, the same on every rank and for every shape
            total = total + parts[r]
        return total

    def gather_last(self, x: torch.Tensor, size: Optional[int] = None) -> torch.Tensor:
        """Concatenate every rank's ``x`` along the last dim in rank order (vocab slices -> full
        logits rows), cut to ``size`` columns (the slices may be padded)."""
        parts = self.gather(x)  # [world, ..., n]
        full = parts.movedim(0, -2).reshape(*x.shape[:-1], self.world * x.shape[-1])
        return (full if size is None else full[..., :size]).contiguous()

    def agree(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` on every rank, then make every rank learn whether any rank failed: a failure
        on one rank raises :class:`DistributedError` on every rank with the failing ranks'
        messages (instead of the others hanging in their next collective)."""
        try:
            result, err = fn(), None
        except Exception as exc:  # noqa: BLE001 (any failure must reach the other ranks)
            result, err = None, f"{type(exc).__name__}: {exc}"
        errors: list = [None] * self.world
        dist.all_gather_object(errors, err, group=self.group)
        failed: dict = {}  # message -> the ranks that got it
        for r, e in enumerate(errors):
            if e is not None:
                failed.setdefault(e, []).append(r)
        if failed:
            n = sum(map(len, failed.values()))
            lines = "; ".join(f"rank{'s' * (len(rs) > 1)} {', '.join(map(str, rs))}: {e}"
                              for e, rs in failed.items())
            raise DistributedError(f"{what} failed on {n} of {self.world} ranks: {lines}")
        return result

    def same_everywhere(self, value, what: str) -> None:
        """Raise on every rank unless every rank passes an equal (picklable) ``value``."""
        values: list = [None] * self.world
        dist.all_gather_object(values, value, group=self.group)
        odd = [r for r, v in enumerate(values) if v != values[0]]
        if odd:
            raise DistributedError(f"ranks disagree on {what}: rank 0 has {values[0]!r}, rank "
                                   f"{odd[0]} has {values[odd[0]]!r}")


def env_world_size() -> int:
    """WORLD_SIZE set by torchrun (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: Optional[str] = None, reduce: Optional[str] = None,
                  timeout_s: Optional[float] = None) -> Optional[TensorParallel]:
    """Under ``torchrun`` (WORLD_SIZE > 1): initialize the default process group — NCCL when
    ``device`` is CUDA (each rank on ``cuda:LOCAL_RANK``), gloo on CPU — and return the
    :class:`TensorParallel` over all ranks. Returns None in a plain single process.
    ``reduce`` defaults to $DSPARK_TP_REDUCE or "gather"; ``timeout_s`` (default
    $DSPARK_DIST_TIMEOUT or 600) bounds every collective."""
    if env_world_size() <= 1:
        return None
    reduce = reduce or os.environ.get("DSPARK_TP_REDUCE", "gather")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE is set but {missing} are not: launch with torchrun")
    if timeout_s is None:
        timeout_s = float(os.environ.get("DSPARK_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    timeout = datetime.timedelta(seconds=timeout_s)
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if not dist.is_initialized():
        if cuda:
            os.environ.update(NO_MULTICAST)
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", timeout=timeout,
                                    device_id=torch.device("cuda", local))
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return TensorParallel(reduce=reduce)


def local_device(device: Optional[str] = None) -> str:
    """The device this rank computes on: ``cuda:LOCAL_RANK`` for CUDA under torchrun."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if env_world_size() > 1 and device.startswith("cuda"):
        if device != "cuda":  # every rank would name the same GPU
            raise ValueError(f"under torchrun each rank runs on cuda:LOCAL_RANK: pass --device "
                             f"cuda, not {device!r}")
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def shutdown(barrier: bool = True) -> None:
    """Destroy the default process group. With ``barrier`` every rank first waits for the
    others: a gloo rank tearing its group down while a peer still uses the connection aborts
    the process ("terminate called without an active exception")."""
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def who(tp: Optional[TensorParallel]) -> str:
    """' (rank r of w)' for messages every rank prints; '' in a single process."""
    return "" if tp is None else f" (rank {tp.rank} of {tp.world})"
