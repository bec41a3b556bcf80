"""Microbenchmark of dspark::kv_commit (tree-path compaction of the KV cache after verify) at the
Qwen3-8B cache shape (36 layers, 8 KV heads, head_dim 128, bf16), contiguous and paged
(page_size 16) layouts, R requests, replayed from a CUDA graph, against what a copy of the same
bytes costs.

Each request verified a tree of --nodes nodes and accepted a path of depth --accept (random
increasing node ids, so nearly every row moves). Moved bytes = moved rows x layers x (K + V) x
heads x head_dim x 2 B; "GB/s" counts them read and written (2x), like the copy bandwidth it is
compared with: a 1 GiB device-to-device copy (the peak), and a copy of exactly the moved bytes
(what any single launch moving them costs, launch and tail included; L2-warm when small).
"torch" is the PyTorch gather/scatter the engine used before (contiguous only). L2 stays cold:
each replay's requests sit at one of --variants start slots spread over the cache (set before
the replay, untimed).
Every variant is checked against dspark.reference.kv_commit on a small cache first.

    python bench/bench_kv_commit.py --out bench/results/<date>/bench_kv_commit.json
    python bench/bench_kv_commit.py --R 64 --layouts paged --nvtx --reps 3    # under a profiler

ncu recipe (one kernel of the R = 64 paged run, full set: achieved DRAM bandwidth, occupancy,
stall reasons):

    ncu --nvtx --nvtx-include "kv_commit paged R64/" -k regex:kv_commit_kernel -c 1 \
        --set full -o kv_commit_paged_R64 \
        python bench/bench_kv_commit.py --R 64 --layouts paged --nvtx --reps 3
"""
import argparse
import contextlib
import json
import random
import sys
import time

import torch

import dspark
from dspark import reference
from dspark.timing import graph_replay_seconds

L, H, D, DTYPE, PAGE = 36, 8, 128, torch.bfloat16, 16


def torch_commit(k, v, start, nodes, count, offsets):
    """The engine's former commit (KVCache.commit before dspark::kv_commit), flat ids in."""
    B, W = nodes.shape
    depth = torch.arange(W, device=start.device)[None, :]
    valid = depth <= count[:, None]
    dst = start[:, None] + depth
    src = torch.where(valid, start[:, None] + (nodes - offsets[:-1, None]).clamp(min=0), dst)
    bidx = torch.arange(B, device=start.device)[:, None]
    for buf in (k, v):
        buf[:, bidx, :, dst] = buf[:, bidx, :, src]


def make_batch(R, nodes, accept, S, layout, rnd, dev="cuda"):
    """Caches, block table and verify outputs: R trees of `nodes` nodes, paths of depth `accept`."""
    paths = [[0] + sorted(rnd.sample(range(1, nodes), accept)) for _ in range(R)]
    offsets = torch.arange(R + 1, device=dev) * nodes
    # accept_nodes is [R, W] with W >= a request's nodes (verify's width): -1 padded past the path
    flat = torch.tensor([[u + r * nodes for u in p] + [-1] * (nodes - len(p))
                         for r, p in enumerate(paths)], device=dev)
    count = torch.full((R,), accept, device=dev)
    table = None
    if layout == "contiguous":
        shape = (L, R, H, S, D)
    else:
        per = S // PAGE
        table = torch.randperm(R * per + 7, device=dev)[:R * per].view(R, per).int()
        shape = (L, R * per + 7, PAGE, H, D)
    k = torch.empty(shape, dtype=DTYPE, device=dev).normal_()
    v = torch.empty(shape, dtype=DTYPE, device=dev).normal_()
    moved_rows = sum(sum(1 for d, u in enumerate(p) if u != d) for p in paths)
    return dict(k=k, v=v, nodes=flat, count=count, offsets=offsets, table=table), moved_rows


def check(R, nodes, accept, layout, rnd):
    """The op equals the reference on a small cache of the same layout and path shapes (with the
    data checks read back: an input the op would reject raises here instead of being skipped)."""
    b, _ = make_batch(R, nodes, accept, 64, layout, rnd)
    start = torch.randint(0, 64 - nodes + 1, (R,), device="cuda")
    want = [t.clone() for t in (b["k"], b["v"])]
    with dspark.ops.sync_checks(True):
        got = dspark.ops.kv_commit(b["k"], b["v"], start, b["nodes"], b["count"], b["offsets"],
                                   b["table"])
    exp = reference.kv_commit(*want, start, b["nodes"], b["count"], b["offsets"], b["table"])
    assert torch.equal(b["k"], want[0]) and torch.equal(b["v"], want[1]), "kv_commit != reference"
    assert all(torch.equal(g, w) for g, w in zip(got, exp)), "kv_commit outputs != reference"


@contextlib.contextmanager
def nvtx(name, on):
    if on:
        torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        if on:
            torch.cuda.nvtx.range_pop()


def copy_us(nbytes, reps):
    """Median µs of a graphed device-to-device copy of nbytes (one copy kernel). Below ~25 MB
    its buffers stay in L2 across replays: a lower bound for the same bytes moved cold."""
    src = torch.empty(max(nbytes // 2, 1), dtype=DTYPE, device="cuda")
    dst = torch.empty_like(src)
    return graph_replay_seconds(lambda: dst.copy_(src), reps) * 1e6


def bench(R, layout, args, rnd, peak_gbps):
    check(R, args.nodes, args.accept, layout, rnd)
    b, moved_rows = make_batch(R, args.nodes, args.accept, args.S, layout, rnd)
    starts = torch.randint(0, args.S - args.nodes + 1, (args.variants, R), device="cuda")
    start = starts[0].clone()
    turn = [0]

    def reset():
        turn[0] = (turn[0] + 1) % args.variants
        start.copy_(starts[turn[0]])

    def op():
        return torch.ops.dspark.kv_commit(b["k"], b["v"], start, b["nodes"], b["count"],
                                          b["offsets"], b["table"])

    moved = moved_rows * L * 2 * H * D * DTYPE.itemsize
    name = f"kv_commit {layout} R{R}"
    with nvtx(name, args.nvtx):
        op()  # one eager launch inside the range (what ncu --nvtx-include catches)
        us = graph_replay_seconds(op, args.reps, reset=reset) * 1e6
    row = dict(layout=layout, R=R, nodes=args.nodes, accept=args.accept, moved_rows=moved_rows,
               moved_MB=moved / 1e6, us=us, GBps=2 * moved / us / 1e3)
    row["pct_of_copy_peak"] = 100 * row["GBps"] / peak_gbps
    row["same_bytes_copy_us"] = copy_us(moved, args.reps)
    row["pct_of_same_bytes_copy"] = 100 * row["same_bytes_copy_us"] / us
    if layout == "contiguous":
        with nvtx(f"torch commit R{R}", args.nvtx):
            row["torch_us"] = graph_replay_seconds(
                lambda: torch_commit(b["k"], b["v"], start, b["nodes"], b["count"], b["offsets"]),
                args.reps, reset=reset) * 1e6
    b.clear()  # frees the caches before the next variant
    torch.cuda.empty_cache()
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--R", default="1,64")
    ap.add_argument("--layouts", default="contiguous,paged")
    ap.add_argument("--nodes", type=int, default=16, help="tree nodes per request")
    ap.add_argument("--accept", type=int, default=7, help="accepted depth (path length - 1)")
    ap.add_argument("--S", type=int, default=2048, help="cache slots per request")
    ap.add_argument("--variants", type=int, default=32, help="start vectors rotated (cold L2)")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--nvtx", action="store_true", help="NVTX range per variant (nsys / ncu)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    assert torch.cuda.is_available() and dspark.cuda_available(), "needs a GPU and a CUDA build"
    assert 1 <= args.accept < args.nodes, "need 1 <= accept < nodes"
    rnd = random.Random(0)
    big = 1 << 30
    with nvtx("copy 1GiB", args.nvtx):
        peak = 2 * big / copy_us(big, max(args.reps // 10, 10)) / 1e3
    print(f"device {torch.cuda.get_device_name()}  copy peak {peak:.0f} GB/s (read + write)",
          flush=True)
    rows = []
    with dspark.ops.sync_checks(False):
        for layout in args.layouts.split(","):
            for R in map(int, args.R.split(",")):
                rows.append(bench(R, layout, args, rnd, peak))
                print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           date=time.strftime("%Y-%m-%d"), copy_peak_GBps=round(peak, 1),
                           shape=dict(L=L, H=H, D=D, dtype=str(DTYPE), page_size=PAGE, S=args.S),
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
