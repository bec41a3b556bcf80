"""dspark::fused_linear on the Qwen3-8B projections (bf16) against cuBLAS, median µs per call.

Per shape and row count M: ``ours`` = fused_linear with the prologue/epilogue the runner uses
for that projection; ``cublas`` = the bare F.linear (cuBLAS's pick for the GEMV/GEMM alone);
``unfused`` = the PyTorch ops fused_linear replaces (RMSNorm / SiLU-gate, F.linear, residual
add), eager. Timing: CUDA-graph replay, weights rotated through copies larger than 2x L2 so every
weight read comes from HBM. Roofline: weight bytes at the copy bandwidth measured in the run.

    python bench/bench_linear.py [--M 1,8,32,64] [--reps 200] [--out bench_linear.json]

M is the number of token rows: 1 = batch-1 decode, 8 = a batch-1 verify of gamma + 1 = 8,
32 / 64 = batch 4 / 8 verifies. fused_linear reads the weight once per 64 rows at any M.
"""
import argparse
import json

import torch
import torch.nn.functional as F
from bench_ops import L2_BYTES, copy_bandwidth, time_graph

import dspark

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 4096, 12288, 32, 8, 128, 151936
# name, N, K, prologue, residual (as the runner calls them)
SHAPES = [("qkv", (HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN, "norm", False),
          ("o", HIDDEN, HEADS * HEAD_DIM, "plain", True),
          ("gate_up", 2 * INTER, HIDDEN, "norm", False),
          ("down", HIDDEN, INTER, "gate", True),
          ("lm_head", VOCAB, HIDDEN, "norm", False)]


def rms_norm(x, w, eps=1e-6):  # the runner's RMSNorm module, written out
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def bench_shape(name, N, K, kind, residual, M, reps, bw):
    dt = torch.bfloat16
    wbytes = N * K * 2
    n_copies = max(2, -(-2 * L2_BYTES // wbytes))
    gen = torch.Generator(device="cuda").manual_seed(0)
    copies = []
    for _ in range(n_copies):
        x = torch.randn(M, 2 * K if kind == "gate" else K, device="cuda", generator=gen).to(dt)
        w = (torch.randn(N, K, device="cuda", generator=gen) * K ** -0.5).to(dt)
        g = torch.rand(K, device="cuda", generator=gen).to(dt) + 0.5
        r = torch.randn(M, N, device="cuda", generator=gen).to(dt) if residual else None
        copies.append((x, w, g, r))

    def ours(c):
        x, w, g, r = c
        return dspark.ops.fused_linear(x, w, residual=r, norm_weight=g if kind == "norm" else None,
                                       silu_gate=kind == "gate")

    def cublas(c):
        x, w, _, _ = c
        return F.linear(x[:, :K], w)

    def unfused(c):
        x, w, g, r = c
        if kind == "norm":
            x = rms_norm(x, g)
        elif kind == "gate":
            x = F.silu(x[:, :K]) * x[:, K:]
        y = F.linear(x, w)
        return y + r if r is not None else y

    got, want = ours(copies[0]).float(), unfused(copies[0]).float()
    max_err = (got - want).abs().max().item()
    floor_us = wbytes / bw * 1e6
    row = dict(name=name, M=M, N=N, K=K, prologue=kind, residual=residual,
               floor_us=round(floor_us, 2), max_abs_diff_vs_unfused=max_err)
    for label, fn in (("ours", ours), ("cublas", cublas), ("unfused", unfused)):
        us = time_graph(fn, copies, reps)
        row[f"{label}_us"] = round(us, 2)
        row[f"{label}_pct_of_floor"] = round(100 * floor_us / us, 1)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--M", default="1,8,32,64")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s (read + write); bf16 weights; µs median")
    print(f"{'proj':8} {'M':>2} {'floor':>7} {'ours':>8} {'%':>5} {'cublas':>8} {'%':>5} "
          f"{'unfused':>8} {'maxdiff':>8}")
    rows = []
    for M in (int(m) for m in a.M.split(",")):
        tot = dict(floor=0.0, ours=0.0, cublas=0.0, unfused=0.0)
        for shape in SHAPES:
            r = bench_shape(*shape, M, a.reps, bw)
            rows.append(r)
            print(f"{r['name']:8} {M:>2} {r['floor_us']:>7.1f} {r['ours_us']:>8.1f} "
                  f"{r['ours_pct_of_floor']:>5.1f} {r['cublas_us']:>8.1f} "
                  f"{r['cublas_pct_of_floor']:>5.1f} {r['unfused_us']:>8.1f} "
                  f"{r['max_abs_diff_vs_unfused']:>8.3g}", flush=True)
            mult = 1 if r["name"] == "lm_head" else 36  # one decode step of the 36-layer model
            for k in tot:
                tot[k] += mult * r[f"{k}_us"]
        print(f"per 36-layer step, M={M}: floor {tot['floor'] / 1e3:.3f} ms, ours "
              f"{tot['ours'] / 1e3:.3f} ms, cuBLAS GEMMs alone {tot['cublas'] / 1e3:.3f} ms, "
              f"unfused ops {tot['unfused'] / 1e3:.3f} ms")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(copy_GBps=round(bw / 1e9), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
