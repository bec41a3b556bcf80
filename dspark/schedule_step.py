"""Confidence-scheduled verification inside the engine's step (docs/method.md, "Scheduling").

After the draft, :meth:`VerifyScheduler.lengths` asks :func:`dspark.ops.schedule_prefix` for
each request's verify length l_r from the drafter's calibrated confidences and the SPS table
(:mod:`dspark.scheduler`); the host picks the verify's row count (:meth:`VerifyScheduler.rows`);
:meth:`VerifyScheduler.pack` packs the admitted prefixes (anchor + first l_r drafts, so l_r = 0
is one plain decoding step) into a :class:`VerifyBatch`: ``sum(l_r + 1)`` rows, which the
target forward runs its projections on (:class:`dspark.models.transformer.PackedLayout`) and
``dspark.ops.verify`` verifies exactly as any ragged chain. Finished requests propose nothing.
On GPU a scheduled step is two CUDA graphs (draft + lengths, then the verify of one row bucket)
with the host's choice of bucket between them.

**The row count.** A forward replayed from a CUDA graph has a static shape, so the host must
know the rows N = sum(l_r + 1) before it queues the forward. It pads N + 1 up to a *bucket*
(:func:`bucket_rows`: 8..64 in powers of two, then four per octave, so at most ~20 % of the rows
are padding; one verify graph per bucket, all in one shared memory pool). The rows past N
belong to one *scratch request* appended to the verify batch (a star of nodes under a root,
greedy): the runner writes them to a scratch row (no cache slot, no real output) and the verify
result of the scratch request is dropped, so N itself never has to be known on the device.

- ``async``: the budget K of step t is :func:`dspark.ops.schedule_budget` on the confidences of
  step t - 2 (the first two steps: ``first_budget``, default every draft), so N <= R + K is
  known on the host before step t is drafted: the engine runs one step ahead of the GPU and has
  already waited for step t - 2's end, so reading K from the pinned host copy made at step
  t - 2 never stalls.
- ``sync`` / ``threshold``: l depends on this step's drafts, so the host reads N after the
  scheduling kernel: **one host sync per step**, the cost of these modes. It lets the GPU drain
  (the host queues the forward only after reading N: one launch latency of the next stages,
  tens of microseconds, against a verify forward of milliseconds at the loads where scheduling
  matters). The alternative, a bound known without the read, would have to be R * (gamma + 1)
  (confidences near 1 admit every draft under an affine step-time curve): a padded forward,
  which is what scheduling exists to avoid. Measured on CPU (bench/bench_sched_step.py, R = 8
  to 64, gamma = 7, mean l = 2: 36-43 % of the rows): the packed forward takes 0.54-0.58x the
  padded one's time, while the read adds ~1.3 us to the 2-5 us scheduling op
  (bench/results/2026-12-06/sched_step_cpu.json). So the modes read N; ``async`` needs no read.

``fixed`` (the default) is not scheduled at all: the engine verifies the drafter's proposal as
it is (:meth:`VerifyBatch.full`).
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple, Optional, Sequence, Union

import torch

from . import ops
from .models.transformer import PackedLayout
from .ops import SamplingTensors, VerifyResult
from .scheduler import SPSTable, load_sps, parse_schedule, ranking_table
from .state import Proposal, SpecState

MAX_VERIFY_WIDTH = 4096  # dspark.ops.verify's largest max_nodes (the scratch request's width)


def bucket_rows(n: int, cap: int) -> int:
    """The captured row count for n rows: 8, 16, 32, 64, then multiples of a quarter of the
    octave (80, 96, 112, 128, 160, ...), at most ``cap`` (and at least n)."""
    if n <= 64:
        b = max(8, 1 << (n - 1).bit_length())
    else:
        step = 1 << ((n - 1).bit_length() - 3)
        b = -(-n // step) * step
    return max(n, min(b, cap))


def bucket_grid(max_tokens: int) -> list:
    """Verify sizes B worth measuring for an SPS table of a bucketed engine: a B-token verify
    runs as bucket_rows(B + 1) rows (one scratch row), so SPS is a step function whose steps
    sit at B = bucket - 1 (profile with interpolate="step")."""
    grid, n = set(), 1
    while n <= max_tokens:
        b = bucket_rows(n + 1, 10**9)
        grid.add(min(b - 1, max_tokens))
        n = b
    return sorted(grid | {max_tokens})


@functools.lru_cache(maxsize=None)
def _bucket_floor(b: int) -> int:
    """The largest bucket below b (0 if none): a row count that rounds up to b exceeds it."""
    return max((nb for nb in map(lambda n: bucket_rows(n, b), range(1, b)) if nb < b), default=0)


class VerifyBatch(NamedTuple):
    """What the target forward and ``dspark.ops.verify`` of one step see: ``proposal`` holds the
    packed rows [N] and node_offsets [R' + 1] over R' = ``requests`` real requests, plus one
    scratch request owning the padding rows when the batch is scheduled (``layout`` set)."""
    proposal: Proposal
    requests: int  # R
    width: int  # the drafter's max_nodes W
    params: SamplingTensors  # [R']
    seeds: torch.Tensor  # [R']
    positions: torch.Tensor  # [R'] root positions
    max_nodes: int  # verify's output width
    # scheduled: where the packed rows sit in the drafter's [R, W] proposal (dest: R * W for
    # padding); the target forward's packed layout too, so it is built once per step
    layout: Optional[PackedLayout]

    @classmethod
    def full(cls, prop: Proposal, st: SpecState, root: torch.Tensor, width: int) -> "VerifyBatch":
        """The drafter's proposal as it is (fixed gamma)."""
        return cls(prop, st.batch, width, st.params, st.seeds, root, width, None)

    def forward_offsets(self) -> torch.Tensor:
        """node_offsets [R + 1] of the real requests (the rows past them are padding)."""
        return self.proposal.node_offsets[:self.requests + 1]

    def restore(self, full: Proposal, res: VerifyResult, hidden: Optional[torch.Tensor]):
        """The verify result [R, W] with accept_nodes numbered in ``full`` (the drafter's
        proposal) and the tapped rows [n, R * W, hidden] in its layout (rows that were not
        verified hold zeros: they sit past the new anchor, where drafters never look)."""
        if self.layout is None:
            return res, hidden
        R, W = self.requests, self.width
        shift = (full.node_offsets[:R] - self.proposal.node_offsets[:R])[:, None]
        nodes = res.accept_nodes[:R, :W]
        res = VerifyResult(res.out_tokens[:R, :W].contiguous(), res.accept_count[:R],
                           torch.where(nodes >= 0, nodes + shift, -1))
        if hidden is not None:
            out = hidden.new_zeros(hidden.shape[0], R * W + 1, hidden.shape[2])
            out[:, self.layout.dest] = hidden
            hidden = out[:, :R * W]
        return res, hidden


SPSSource = Union[None, str, os.PathLike, SPSTable, Sequence[float], torch.Tensor]


def check_step_overhead(overhead) -> float:
    """A step overhead in seconds (VerifyScheduler), or a ValueError naming it."""
    if isinstance(overhead, bool) or not isinstance(overhead, (int, float)) \
            or not 0.0 <= overhead < float("inf"):
        raise ValueError(f"step overhead must be a finite number of seconds >= 0, got "
                         f"{overhead!r}")
    return float(overhead)


class VerifyScheduler:
    """The engine's scheduler for one mode (``"sync" | "async" | "threshold:X"``).

    sps: the steps-per-second table: None (the runner's cached table, profiled on first use), a
    JSON path (:func:`dspark.scheduler.load_sps`), an :class:`SPSTable`, or the values
    SPS(1), SPS(2), ... themselves (synthetic tables, tests). buckets: pad the row count to
    :func:`bucket_rows` (needed by CUDA graphs; default: when the runner captures graphs).
    first_budget: async only, the budget of the first two steps, before one from two steps back
    exists (any value independent of the current drafts keeps the output exact; None: every
    draft, i.e. fixed gamma for two steps). overhead: seconds every step costs besides the verify
    forward the table times (the draft, accept, commit: ``dspark bench``'s time split); the
    scheduler ranks with SPS'(B) = 1 / (1 / SPS(B) + overhead), SPS with its bucket edges spread
    over the buckets (:func:`dspark.scheduler.ranking_table`). The table alone makes one more
    verify token look dearer than it is when the step's fixed costs are large (measured on the
    benchmark pair: sync verified 0.92 drafts a request at batch 4, 0.29 at 128, and lost to
    fixed gamma). A fixed number, independent of the drafts: the output stays exact."""

    def __init__(self, spec: str, sps: SPSSource = None, buckets: Optional[bool] = None,
                 first_budget: Optional[int] = None, overhead: float = 0.0):
        self.overhead = check_step_overhead(overhead)
        self.mode, self.threshold = parse_schedule(spec)
        if self.mode == "fixed":
            raise ValueError("fixed gamma is not scheduled: use no scheduler")
        self.spec, self.source, self.buckets = spec, sps, buckets
        self.table: Optional[list] = None  # SPS(B) for B = 1..len
        self.sps: Optional[torch.Tensor] = None  # the table on the device
        self.first_budget = first_budget
        self.rows_log: list = []  # per step of the last generate(): the forward's rows
        self._serial = 0  # bumped when the buffers the stage graphs read are reallocated
        self._batch = None

    def graph_key(self) -> int:
        """Changes whenever the buffers a captured step reads (SPS table, budgets) are remade."""
        return self._serial

    def check(self, drafter) -> None:
        """Named errors for drafters this mode cannot schedule."""
        name = type(drafter).__name__
        if not drafter.is_chain:
            raise ValueError(f"schedule {self.spec!r} needs chain proposals: {name} proposes "
                             f"token trees (use schedule 'fixed', or tree_topk 1)")
        if not drafter.has_confidences:
            raise ValueError(f"schedule {self.spec!r} ranks drafts by calibrated confidences and "
                             f"{name} has no confidence head (only DSpark drafters have one): "
                             f"use schedule 'fixed'")
        if drafter.gamma > 32:
            raise ValueError(f"schedule {self.spec!r} supports gamma <= 32, got {drafter.gamma}")

    # ---- per generate() call -----------------------------------------------------------------
    def prepare(self, runner, batch: int, width: int) -> None:
        """Before the KV cache is allocated (profiling a table reallocates it): an SPS table
        covering B = batch * width verify tokens (threshold mode needs none unless given)."""
        need = batch * width
        if batch * (width - 1) > 16384:
            raise ValueError(f"scheduling supports batch * gamma <= 16384 drafts per step, got "
                             f"{batch} x {width - 1}")
        if self.mode == "async" and batch * (width - 1) + 1 > MAX_VERIFY_WIDTH:
            raise ValueError(f"async scheduling supports batch * gamma < {MAX_VERIFY_WIDTH} "
                             f"drafts per step (the padding request's width), got {batch} x "
                             f"{width - 1}")
        if self.table is not None and len(self.table) >= need:
            return
        src = self.source
        if src is None and self.mode == "threshold":
            return
        if src is None:  # the cached table, else measured now (at the bucket sizes if padded)
            kw = dict(grid=bucket_grid(need), interpolate="step") if self.buckets else {}
            table = load_sps(runner, need, profile=True, gamma=width - 1, **kw).sps
        elif isinstance(src, (str, os.PathLike)):
            table = load_sps(src, need).sps
        elif isinstance(src, SPSTable):
            table = src.sps
        else:
            table = [float(x) for x in src]
        if len(table) < need:
            raise ValueError(f"the SPS table covers B <= {len(table)} verify tokens; batch "
                             f"{batch} x {width} needs {need}")
        if not all(x > 0 for x in table):
            raise ValueError("SPS table entries must be > 0")
        self.table = list(table)
        self.sps = None

    def start(self, st: SpecState, drafter) -> None:
        """Buffers for this batch (kept while the batch size is), reset for a new call."""
        dev, R, G = st.tokens.device, st.batch, drafter.gamma
        if self.table is not None and (self.sps is None or self.sps.device != dev):
            # ranked with bucket edges spread over their buckets, plus the step's fixed cost
            table = [1.0 / (1.0 / s + self.overhead) for s in ranking_table(self.table)]
            self.sps = torch.tensor(table, dtype=torch.float32, device=dev)
            self._serial += 1
        if self._batch != (R, dev):
            self._batch = (R, dev)
            self._serial += 1
            # budgets of the two previous steps [K_{t-2}, K_{t-1}] and their host copies
            self.budget = torch.zeros(2, dtype=torch.int64, device=dev)
            cuda = dev.type == "cuda"
            self._host = [torch.zeros((), dtype=torch.int64, pin_memory=cuda) for _ in range(2)]
            self._events = [torch.cuda.Event() for _ in range(2)] if cuda else None
            # the packed verify's per-request inputs, R requests + the scratch request (greedy,
            # seed 0, root 0): persistent, so a step only copies this round's roots in
            self._params = SamplingTensors(torch.zeros(R + 1, dtype=torch.float32, device=dev),
                                           torch.zeros(R + 1, dtype=torch.int64, device=dev),
                                           torch.ones(R + 1, dtype=torch.float32, device=dev))
            self._seeds = torch.zeros(R + 1, dtype=torch.int64, device=dev)
            self._roots = torch.zeros(R + 1, dtype=torch.int64, device=dev)
        for mine, theirs in zip((*self._params, self._seeds), (*st.params, st.seeds)):
            mine[:R].copy_(theirs)  # fixed for the whole generate() call
        self._first = R * G if self.first_budget is None else min(self.first_budget, R * G)
        self.budget.fill_(self._first)
        self.step, self.rows_log = 0, []
        self._cuda = self._events is not None

    # ---- per step (the engine: lengths, then rows on the host, then pack) ----------------------
    def lengths(self, st: SpecState, d) -> tuple[torch.Tensor, torch.Tensor]:
        """l [R] from this step's confidences, logged with the tokens they are expected to
        commit; returns l and sum(l) (static shapes, no host sync: part of a captured step)."""
        c, a = d.confidences()  # [R, gamma]: calibrated c_k and prefix survival a_k
        c = c.float()
        lengths = st.active.long() * d.gamma  # finished requests propose nothing
        if self.mode == "async":
            ell = ops.schedule_prefix(c, lengths, None, "async", budget=self.budget[0])
            self.budget[0].copy_(self.budget[1])
            self.budget[1].copy_(ops.schedule_budget(c, lengths, self.sps))
        else:
            ell = ops.schedule_prefix(c, lengths, self.sps, self.mode, self.threshold)
        row = st.rounds.clamp(max=st.round_verified.shape[0] - 1)[None]  # this round's log row
        st.round_verified.index_copy_(0, row, ell[None])
        admitted = torch.arange(d.gamma, device=c.device) < ell[:, None]
        expected = 1 + (a.double() * admitted).sum(1)  # 1 + sum of admitted a
        st.round_expected.index_copy_(0, row, (expected * st.active).sum()[None])
        return ell, ell.sum()

    def rows(self, st: SpecState, d, drafts: torch.Tensor) -> Optional[tuple[int, int]]:
        """On the host, after :meth:`lengths` is queued: the verify's rows (N + padding) and the
        scratch request's width; None when every draft of every request is admitted (sync /
        threshold): the drafter's proposal is then verified as it is, as fixed gamma does (no
        packing, no scratch row, no bucket: R * W rows, not the bucket above R * W + 1).
        ``drafts``: sum(l), read in sync / threshold mode only."""
        R, W, G = st.batch, d.max_nodes, d.gamma
        if self.mode == "async":  # N <= R + K, K from two steps back (host copy: no stall)
            floor, most = R, R + min(self._stale_budget(self._first), R * G)
            self._stash_budget()
        else:  # this step's drafts decide N: read it (the one host sync of sync/threshold)
            n = int(drafts)
            if n == R * G:
                return self._logged(R * W, None)
            floor = most = R + n
        shape = self._shape(R, W, most, floor)
        return self._logged(shape[0], shape)

    def _shape(self, R: int, W: int, most: int, floor: int) -> tuple[int, int]:
        """(rows, scratch width) of a verify of at most ``most`` and at least ``floor`` real
        rows."""
        rows = most + 1  # at least one scratch row
        if self.buckets:
            rows = bucket_rows(rows, R * W + 1)
            if self.mode != "async":  # the scratch width must not depend on N within a bucket
                floor = max(R, _bucket_floor(rows))
        width = max(W, rows - floor)  # the scratch request's rows are at most rows - floor
        if width > MAX_VERIFY_WIDTH:
            raise ValueError(f"{rows - floor} padding rows exceed verify's width limit")
        return rows, width

    def shapes(self, R: int, W: int, G: int) -> list:
        """Every verify shape :meth:`rows` can pick at batch R (None: the whole proposal, sync /
        threshold with every draft admitted): the row buckets whose graphs the engine captures
        up front."""
        out = set()
        for n in range(R * G + 1):  # admitted drafts (async: the budget's)
            if self.mode != "async" and n == R * G:
                out.add(None)
            else:
                out.add(self._shape(R, W, R + n, R if self.mode == "async" else R + n))
        return sorted(out, key=lambda s: (-1,) if s is None else s)

    def _logged(self, rows: int, shape):
        """Logs this step's forward rows (metrics) and returns ``shape``."""
        self.rows_log.append(rows)
        self.step += 1
        return shape

    def _stale_budget(self, default: int) -> int:
        """K of step t - 2 (``default`` for the first two steps)."""
        if self.step < 2:
            return default
        slot = self.step % 2
        if self._cuda:
            self._events[slot].synchronize()  # recorded at step t - 2: already done
        return int(self._host[slot])

    def _stash_budget(self) -> None:
        """Copy this step's K (read at step t + 2) to the host without waiting for it."""
        slot = self.step % 2
        self._host[slot].copy_(self.budget[1], non_blocking=self._cuda)
        if self._cuda:
            self._events[slot].record()

    def pack(self, st: SpecState, prop: Proposal, root: torch.Tensor, ell: torch.Tensor,
             rows: int, width: int) -> VerifyBatch:
        """The admitted prefixes packed into ``rows`` rows: request r's anchor and first l_r
        drafts, then the scratch request (a root and a star of children, greedy) filling the
        rest. Everything the scratch request reads is valid (token 0, row 0's q)."""
        R, dev = st.batch, ell.device
        W = prop.draft_tokens.shape[0] // R  # a chain proposal: W nodes per request
        # fill_ / out= only: `off[i] = python_int` copies a CPU scalar tensor, which a CUDA-graph
        # capture refuses (torch 2.11)
        off = torch.empty(R + 2, dtype=torch.int64, device=dev)
        off[:1].zero_()
        torch.cumsum(ell + 1, 0, out=off[1:R + 1])
        off[R + 1:].fill_(rows)
        node = torch.arange(rows, device=dev)
        req = (node[:, None] >= off[None, 1:R + 1]).sum(1)  # R: the scratch request
        col = node - off.gather(0, req)
        real = req < R
        src = torch.where(real, prop.node_offsets.gather(0, req) + col, 0)
        tokens = torch.where(real, prop.draft_tokens[src], 0)
        parents = torch.where(real, col - 1, torch.where(col == 0, -1, 0))
        probs = None if prop.draft_probs is None else prop.draft_probs[src]
        self._roots[:R].copy_(root)
        # the proposal's rows are r * W + j: src is also the forward's padded index of each row
        layout = PackedLayout.of(torch.where(real, src, R * W), src, R, W)
        return VerifyBatch(Proposal(tokens, parents, probs, off), R, W, self._params,
                           self._seeds, self._roots, width, layout)
