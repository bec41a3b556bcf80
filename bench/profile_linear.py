"""A few fused_linear launches for Nsight Compute: one Qwen3-8B projection (bf16) at each row
count M, so ncu's per-kernel sections say what grows with M (bench_linear.py: the time does,
although each weight byte is read once per 64 rows).

    ncu --clock-control none --kernel-name regex:fused_linear --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
        --section LaunchStats --section SchedulerStats python bench/profile_linear.py --M 1,8,32
"""
import argparse

import torch
from bench_linear import SHAPES

import dspark


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--M", default="1,8,32")
    ap.add_argument("--proj", default="gate_up",
                    help="comma-separated, of: " + ", ".join(s[0] for s in SHAPES))
    a = ap.parse_args()
    for proj in a.proj.split(","):
        if proj not in [s[0] for s in SHAPES]:
            raise SystemExit(f"--proj {proj}: not one of {[s[0] for s in SHAPES]}")
        name, N, K, kind, residual = next(s for s in SHAPES if s[0] == proj)
        gen = torch.Generator(device="cuda").manual_seed(0)
        w = (torch.randn(N, K, device="cuda", generator=gen) * K ** -0.5).bfloat16()
        g = torch.rand(K, device="cuda", generator=gen).bfloat16() + 0.5
        for M in (int(m) for m in a.M.split(",")):
            x = torch.randn(M, 2 * K if kind == "gate" else K, device="cuda",
                            generator=gen).bfloat16()
            r = torch.randn(M, N, device="cuda", generator=gen).bfloat16() if residual else None
            torch.cuda.nvtx.range_push(f"{name} M={M}")
            dspark.ops.fused_linear(x, w, residual=r, norm_weight=g if kind == "norm" else None,
                                    silu_gate=kind == "gate")
            torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()
        print("profiled", name, "at M =", a.M)


if __name__ == "__main__":
    main()
