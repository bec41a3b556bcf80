"""Microbenchmarks of dspark::verify and dspark::sample on CUDA (median µs, achieved GB/s).

Timing: CUDA-graph replay of the op, CUDA events, median over --reps, inputs rotated through
copies whose total exceeds 2x L2 so every read comes from HBM. Roofline: bytes the op must read
(every logits row once; a draft-probability row for each request that rejects) at the measured
device copy bandwidth (read + write counted, like the anchors in kernel-anchors.md).

    python bench/bench_ops.py --out bench/results.json
"""
import argparse
import json
import statistics
import sys
import time

import torch
from torch_baseline import chain_verify_torch

import dspark

L2_BYTES = 60 << 20


def copy_bandwidth(nbytes=1 << 30, reps=20):
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) * 1e-3)
    return 2 * nbytes / statistics.median(times)


def time_graph(make_fn, copies, reps):
    """Capture one graph per input copy; replay them round-robin; median µs per replay."""
    graphs = []
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for c in copies:
            make_fn(c)  # warm-up (also allocates)
    torch.cuda.synchronize()
    for c in copies:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            make_fn(c)
        graphs.append(g)
    for g in graphs:
        g.replay()
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        g = graphs[i % len(graphs)]
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3)
    return statistics.median(times)


def make_inputs(R, gamma, V, greedy, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    N = R * (gamma + 1)
    logits = (torch.randn(N, V, device="cuda", generator=gen) * 4).to(torch.bfloat16)
    temp = 0.0 if greedy else 1.0
    params = dspark.ops.sampling_tensors(N, temp, 0, 1.0, device="cuda")
    # Drafts: sample each node's token from a perturbed copy of the target row it should match.
    draft_logits = logits.float() + torch.randn(N, V, device="cuda", generator=gen) * 1.5
    shift = torch.roll(draft_logits.view(R, gamma + 1, V), 1, dims=1).reshape(N, V)
    toks, q = dspark.ops.sample(shift, params, torch.arange(N, device="cuda"),
                                torch.zeros(N, dtype=torch.long, device="cuda"),
                                return_probs=not greedy)
    offsets, parents = dspark.ops.chain_layout([gamma] * R, device="cuda")
    req = dspark.ops.sampling_tensors(R, temp, 0, 1.0, device="cuda")
    return dict(logits=logits, offsets=offsets, tokens=toks, parents=parents,
                q=None if greedy else q.float(), params=req,
                seeds=torch.arange(R, device="cuda"),
                positions=torch.full((R,), 100, device="cuda"),
                uniforms=torch.rand(R, gamma + 1, device="cuda", generator=gen),
                row_seeds=torch.arange(N, device="cuda"))


def bench_case(R, gamma, V, greedy, reps, bw):
    per_copy = R * (gamma + 1) * V * (2 + (0 if greedy else 4))
    n_copies = max(1, min(8, 2 * L2_BYTES // per_copy + 1))  # rotate inputs larger than L2
    copies = [make_inputs(R, gamma, V, greedy, s) for s in range(n_copies)]
    W = gamma + 1

    def ours(c):
        return torch.ops.dspark.verify(c["logits"], c["offsets"], c["tokens"], c["parents"], c["q"],
                                       *c["params"], c["seeds"], c["positions"], None, W)

    def baseline(c):
        return chain_verify_torch(c["logits"], c["tokens"].view(R, W)[:, 1:], c["q"],
                                  c["params"].temperature, gamma, c["uniforms"])

    def sample_only(c):  # sample at the same shapes: one draw per logits row
        n = c["logits"].shape[0]
        return torch.ops.dspark.sample(c["logits"], *sampling_for(n, greedy), c["row_seeds"],
                                       c["row_seeds"], None, False)

    res = ours(copies[0])
    rejecting = int((res[1] < gamma).sum())
    bytes_needed = R * W * V * 2 + (0 if greedy else rejecting * V * 4)
    t_ours = time_graph(ours, copies, reps)
    t_base = time_graph(baseline, copies, reps)
    t_sample = time_graph(sample_only, copies, reps)
    floor_us = bytes_needed / bw * 1e6
    return dict(R=R, gamma=gamma, V=V, mode="greedy" if greedy else "sampled",
                verify_us=round(t_ours, 2), torch_us=round(t_base, 2), sample_us=round(t_sample, 2),
                floor_us=round(floor_us, 2), verify_GBps=round(bytes_needed / t_ours / 1e3, 1),
                pct_roofline=round(100 * floor_us / t_ours, 1),
                speedup_vs_torch=round(t_base / t_ours, 2),
                sample_GBps=round(R * W * V * 2 / t_sample / 1e3, 1),
                mean_accepted=round(float(res[1].float().mean()), 2))


_sampling_cache = {}


def sampling_for(n, greedy):
    key = (n, greedy)
    if key not in _sampling_cache:
        _sampling_cache[key] = dspark.ops.sampling_tensors(n, 0.0 if greedy else 1.0, 0, 1.0,
                                                           device="cuda")
    return _sampling_cache[key]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--R", default="1,8,64")
    ap.add_argument("--gamma", default="1,4,7")
    ap.add_argument("--V", type=int, default=151936)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    assert torch.cuda.is_available() and dspark.cuda_available(), "needs a GPU and a CUDA build"
    bw = copy_bandwidth()
    rows = []
    print(f"device {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e9:.0f} GB/s (r+w)",
          flush=True)
    for greedy in (True, False):
        for R in map(int, args.R.split(",")):
            for g in map(int, args.gamma.split(",")):
                row = bench_case(R, g, args.V, greedy, args.reps, bw)
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_GBps=bw / 1e9,
                           date=time.strftime("%Y-%m-%d"), rows=rows), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
