"""Microbenchmark of the prefix scheduler on CUDA: dspark::schedule_prefix in each mode and
dspark::schedule_budget at R requests x gamma drafts (issue 14's bar: < 15 us at R = 256,
gamma = 7), every variant replayed from a CUDA graph.

Timing as bench/bench_state_ops.py: one graph per variant, replays queued back to back with CUDA
events around each, median over --reps; "launch floor" is a graph of one tiny kernel timed the
same way (any graph of one kernel costs that much; an op's own cost is its time minus the
floor). "in graph" is the per-call time of --chain calls captured back to back in one graph:
what a call costs inside an engine step's graph, without the replay's own launch. "async step"
is what an asynchronous engine step graphs: the budget from stale confidences, then the current
top-K (two kernels). Inputs: confidences c = 1 - 0.5 u^2 (long
likely prefixes, as from a calibrated DSpark head), every request with gamma drafts, an SPS
table of the usual shape (time 10 ms + 0.02 ms per token) over B = 1..R (gamma + 1). Each
variant is checked against dspark.reference before it is timed. --threads A/B-tests the sorting
modes' block size (DSPARK_SCHEDULE_THREADS; "auto" = the launcher's choice), --sorts the launcher's
choice of sort (auto: registers up to 1024 padded keys, group above) against either sort forced
(DSPARK_SCHEDULE_SORT).

    python bench/bench_schedule.py --out bench/results/<date>/bench_schedule.json
    python bench/bench_schedule.py --threads auto,32,128,1024 --R 64,256
    ncu --kernel-name regex:schedule_kernel python bench/bench_schedule.py --R 1,256 --ncu
"""
import argparse
import json
import os
import sys
import time

import torch

import dspark
from dspark import reference
from dspark.timing import graph_replay_seconds


def median_replay_us(fn, reps, reset=None):
    """Median µs of one replay of a CUDA graph of fn(), replays queued back to back as inside
    a decode step's graph (dspark.timing.graph_replay_seconds; ``reset`` untimed)."""
    return graph_replay_seconds(fn, reps, reset=reset) * 1e6


def inputs(R, gamma, seed):
    gen = torch.Generator().manual_seed(seed)
    c = (1 - 0.5 * torch.rand(R, gamma, generator=gen) ** 2).float()
    lengths = torch.full((R,), gamma, dtype=torch.long)
    B = torch.arange(1, R * (gamma + 1) + 1, dtype=torch.float64)
    sps = (1e3 / (10 + 0.02 * B)).float()
    return c, lengths, sps


def bench(R, gamma, reps, chain, threads="auto", sort="registers"):
    c, lengths, sps = inputs(R, gamma, R)
    stale_c, _, _ = inputs(R, gamma, R + 1)
    dc, dl, ds, dstale = c.cuda(), lengths.cuda(), sps.cuda(), stale_c.cuda()
    K = reference.schedule_budget(stale_c, lengths, sps)
    dK = K.cuda()
    ops = dspark.ops
    variants = {
        "sync": (lambda: ops.schedule_prefix(dc, dl, ds, "sync"),
                 reference.schedule_prefix(c, lengths, sps, "sync")),
        "async": (lambda: ops.schedule_prefix(dc, dl, None, "async", budget=dK),
                  reference.schedule_prefix(c, lengths, sps, "async", budget=K)),
        "threshold": (lambda: ops.schedule_prefix(dc, dl, None, "threshold", 0.7),
                      reference.schedule_prefix(c, lengths, sps, "threshold", 0.7)),
        "fixed": (lambda: ops.schedule_prefix(dc, dl, None, "fixed"), lengths),
        "budget": (lambda: ops.schedule_budget(dstale, dl, ds), K),
        "async step": (lambda: ops.schedule_prefix(dc, dl, None, "async",
                                                   budget=ops.schedule_budget(dstale, dl, ds)),
                       reference.schedule_prefix(c, lengths, sps, "async", budget=K)),
    }
    if threads != "auto" or sort != "auto":  # these only matter where the kernel sorts
        variants = {k: v for k, v in variants.items() if k in ("sync", "async", "budget")}
    rows = []
    for name, (fn, want) in variants.items():
        got = fn()
        torch.cuda.synchronize()
        assert torch.equal(got.cpu(), want), f"{name} at R = {R} != reference"
        admitted = int(got.sum()) if got.dim() else int(got)
        in_graph = median_replay_us(lambda: [fn() for _ in range(chain)], reps) / chain
        rows.append(dict(R=R, gamma=gamma, mode=name, threads=threads, sort=sort,
                         us=round(median_replay_us(fn, reps), 2),
                         us_in_graph=round(in_graph, 2), admitted=admitted))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--R", default="1,16,64,256")
    ap.add_argument("--gamma", type=int, default=7)
    ap.add_argument("--reps", type=int, default=1000)
    ap.add_argument("--chain", type=int, default=20, help="calls per graph for the in-graph time")
    ap.add_argument("--threads", default="auto",
                    help="comma list of sorting block sizes to A/B: auto or a power of two 32-1024")
    ap.add_argument("--sorts", default="auto",
                    help="comma list of sorts to A/B: auto (the launcher's choice by key count), "
                    "registers, group")
    ap.add_argument("--out", default=None)
    ap.add_argument("--ncu", action="store_true",
                    help="one eager call per mode and R (sync, async, fixed) for ncu, no timing")
    args = ap.parse_args()
    assert torch.cuda.is_available() and dspark.cuda_available(), "needs a GPU and a CUDA build"
    if args.ncu:
        with dspark.ops.sync_checks(False):
            for R in map(int, args.R.split(",")):
                c, lengths, sps = (t.cuda() for t in inputs(R, args.gamma, R))
                budget = torch.tensor(R * args.gamma // 2, device="cuda")
                dspark.ops.schedule_prefix(c, lengths, sps, "sync")
                dspark.ops.schedule_prefix(c, lengths, None, "async", budget=budget)
                dspark.ops.schedule_prefix(c, lengths, None, "fixed")
        torch.cuda.synchronize()
        return 0
    tiny = torch.zeros(1, device="cuda")
    floor = median_replay_us(lambda: tiny.add_(1), args.reps)
    print(f"device {torch.cuda.get_device_name()}  launch floor (one graphed kernel) "
          f"{floor:.2f} us", flush=True)
    rows = []
    with dspark.ops.sync_checks(False):
        for sort in args.sorts.split(","):
            os.environ["DSPARK_SCHEDULE_SORT"] = sort
            for threads in args.threads.split(","):
                if threads == "auto":
                    os.environ.pop("DSPARK_SCHEDULE_THREADS", None)
                else:
                    os.environ["DSPARK_SCHEDULE_THREADS"] = threads
                for R in map(int, args.R.split(",")):
                    rows += bench(R, args.gamma, args.reps, args.chain, threads, sort)
        os.environ.pop("DSPARK_SCHEDULE_THREADS", None)
        os.environ.pop("DSPARK_SCHEDULE_SORT", None)
    for r in rows:
        if r["R"] == 256 and r["mode"] == "sync" and r["threads"] == "auto":
            print(f"sync at R = 256, gamma = {args.gamma}, {r['sort']} sort: {r['us']:.2f} us "
                  f"replayed alone, "
                  f"{r['us_in_graph']:.2f} us a call in one graph (the bar: < 15 us)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           date=time.strftime("%Y-%m-%d"), launch_floor_us=round(floor, 2),
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
