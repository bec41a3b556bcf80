"""dspark::decode_attention (default: Qwen3-8B heads, 32 q / 8 KV heads of 128, bf16, batch 1)
against the unfused PyTorch ops it replaces (QK-norm, rotary, cache write, SDPA over the masked
cache), median µs per call, CUDA-graph replay; decode (one row) and verify blocks of T rows (a
chain ending at the last slot). Roofline: the K/V bytes of the visible slots at the copy
bandwidth (small caches are latency-bound: the floor is then far below a kernel launch).

    python bench/bench_attention.py [--slots 256,1024,4096,32768] [--rows 1,8,16] [--out f.json]
                                    [--heads 32,8,128] [--batch 1] [--rows-per-block auto,1,2]
                                    [--heads-per-block auto,4]
    # the benchmark pair's layer (4 / 2 heads of 64), and one eager call per shape for ncu:
    ncu --clock-control none --kernel-name regex:decode_attention --section SpeedOfLight \
        --section Occupancy --section WarpStateStats --section LaunchStats \
        python bench/bench_attention.py --heads 4,2,64 --batch 4 --slots 256 --rows 1,8 --ncu
"""
import argparse
import json
import os

import torch
import torch.nn.functional as F
from bench_ops import copy_bandwidth, time_graph

import dspark

H, HKV, D, LAYERS = 32, 8, 128, 2


def unfused(qkv, k_cache, v_cache, pos, inv_freq, qn, kn, S):
    """The runner's unfused attention for one layer (as dspark/models/transformer.py) of a
    causal block: qkv [B, T, width] at positions pos [B, T] (= slots)."""
    B, T = qkv.shape[:2]
    q, k, v = qkv.split([H * D, HKV * D, HKV * D], -1)
    q, k = q.reshape(B, T, H, D), k.reshape(B, T, HKV, D)

    def norm(x, w):
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
    q, k = norm(q, qn).transpose(1, 2), norm(k, kn).transpose(1, 2)
    f = pos.float()[..., None] * inv_freq
    emb = torch.cat((f, f), -1)[:, None]
    cos, sin = emb.cos().to(qkv.dtype), emb.sin().to(qkv.dtype)

    def rot(x):
        x1, x2 = x.chunk(2, -1)
        return torch.cat((-x2, x1), -1)
    q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
    bidx = torch.arange(B, device=qkv.device)[:, None]
    k_cache[1][bidx, :, pos] = k.transpose(1, 2)
    v_cache[1][bidx, :, pos] = v.reshape(B, T, HKV, D)
    mask = (torch.arange(S, device=qkv.device)[None, None, :] <= pos[..., None])[:, None]
    out = F.scaled_dot_product_attention(q, k_cache[1], v_cache[1], attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2).reshape(B, T, H * D)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--slots", default="256,1024,4096,32768")
    ap.add_argument("--rows", default="1,8,16")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--heads", default="32,8,128", help="query heads, KV heads, head dim")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--position", default=None,
                    help="first slot of the block (default: the block ends at slot S - 1); e.g. "
                    "112, the 8B verify forward's (bench_verify_forward.py); comma-separated: "
                    "each (\"end\": S - T)")
    ap.add_argument("--rows-per-block", default="auto",
                    help="kernel 1's rows per thread block to time (auto: the launcher's choice; "
                    "N: DSPARK_ATTN_ROWS_PER_BLOCK=N), comma-separated, for an A/B of the split")
    ap.add_argument("--heads-per-block", default="auto",
                    help="kernel 1's query heads per thread block to time (auto: the kernel's "
                    "rule; N: DSPARK_ATTN_HEADS_PER_BLOCK=N, a divisor of heads / KV heads), "
                    "comma-separated, for an A/B of the split")
    ap.add_argument("--ncu", action="store_true",
                    help="one eager call per shape in an NVTX range, nothing timed (for ncu)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    global H, HKV, D
    H, HKV, D = (int(x) for x in a.heads.split(","))
    B = a.batch
    bw = copy_bandwidth()
    dt, dev = torch.bfloat16, "cuda"
    where = "ending at slot S-1" if a.position is None else f"at slots {a.position}"
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s; heads {H} / {HKV} of {D}, bf16, batch {B}, "
          f"block {where}; µs median")
    rows = []
    for S in (int(s) for s in a.slots.split(",")):
        for T, at in ((int(t), f) for t in a.rows.split(",")
                      for f in (a.position or "end").split(",")):
            first = S - T if at == "end" else int(at)
            gen = torch.Generator(device=dev).manual_seed(0)
            k_cache = torch.randn(LAYERS, B, HKV, S, D, device=dev, generator=gen).to(dt)
            v_cache = torch.randn(LAYERS, B, HKV, S, D, device=dev, generator=gen).to(dt)
            qkv = torch.randn(B, T, (H + 2 * HKV) * D, device=dev, generator=gen).to(dt)
            if not 0 <= first <= S - T:
                raise SystemExit(f"--position {first}: a block of {T} rows must fit {S} slots")
            start = torch.full((B,), first, device=dev)
            pos = start[:, None] + torch.arange(T, device=dev)
            inv_freq = 1.0 / (1e6 ** (torch.arange(0, D, 2, device=dev, dtype=torch.float32) / D))
            qn, kn = torch.ones(D, device=dev, dtype=dt), torch.ones(D, device=dev, dtype=dt)
            ours = lambda _: dspark.ops.decode_attention(  # noqa: E731
                qkv, k_cache, v_cache, 1, start, inv_freq, H, qn, kn)
            base = lambda _: unfused(qkv, k_cache, v_cache, pos, inv_freq, qn, kn, S)  # noqa: E731
            if a.ncu:
                torch.cuda.nvtx.range_push(f"decode_attention S={S} T={T} P={first}")
                ours(None)
                torch.cuda.nvtx.range_pop()
                continue
            floor_us = B * 2 * HKV * (first + T) * D * 2 / bw * 1e6  # the visible slots
            unfused_us = round(time_graph(base, [None], a.reps), 2)
            for rpb, hpb in ((r, h) for r in a.rows_per_block.split(",")
                             for h in a.heads_per_block.split(",")):
                os.environ["DSPARK_ATTN_ROWS_PER_BLOCK"] = "" if rpb == "auto" else rpb
                os.environ["DSPARK_ATTN_HEADS_PER_BLOCK"] = "" if hpb == "auto" else hpb
                diff = (ours(None).float() - base(None).float()).abs().max().item()
                row = dict(slots=S, rows=T, batch=B, heads=[H, HKV, D], rows_per_block=rpb,
                           heads_per_block=hpb, position=first,
                           floor_us=round(floor_us, 2), max_abs_diff=diff,
                           ours_us=round(time_graph(ours, [None], a.reps), 2),
                           unfused_us=unfused_us)
                rows.append(row)
                print(json.dumps(row), flush=True)
            os.environ.pop("DSPARK_ATTN_ROWS_PER_BLOCK", None)
            os.environ.pop("DSPARK_ATTN_HEADS_PER_BLOCK", None)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(copy_GBps=round(bw / 1e9), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
