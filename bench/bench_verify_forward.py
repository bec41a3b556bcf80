"""Verify forwards against decode steps at the Qwen3-8B shape (bf16, random weights, CUDA graphs):
what a speculative round costs the target, and where the dspark kernels stop paying.

For each batch B and verify block of W = gamma + 1 rows per request (chains), the runner paths:
``fused`` = the dspark kernels (fused_linear + decode_attention; batch_invariant=True, so also
above FUSED_MAX_ROWS), ``cublas`` = cuBLAS GEMMs + SDPA + the separate norm / rotary / gate ops
(fused=False, hybrid=False), ``hybrid`` = cuBLAS GEMMs and the module norms / MLP around
dspark::decode_attention (fused=False, hybrid=True: the runner's path above its fused rows).
``--profile``: the kernels of one replay of each call by name (CUPTI), summed GPU µs. Each call is
the runner's graph-replayed forward (input copies + replay, logits of every row), GPU ms per call,
back to back after a warm-up. ``ratio`` = verify ms / the fused decode ms at the same batch (the
issue's bars: W = 8 at B = 1 <= 1.15, 32 rows at B = 4 <= 1.3); ``floor`` = the weights read once
at the copy bandwidth measured in the same run (every parameter but the embedding table). The
crossover (where ``cublas`` verify beats ``fused``) sets FUSED_MAX_ROWS in
dspark/models/transformer.py.

    python bench/bench_verify_forward.py [--layers 36] [--batches 1,2,4,8,16,32] [--rows 4,8,16]
                                         [--variants fused,cublas,hybrid] [--position 112]
                                         [--profile] [--out bench_verify_forward.json]
"""
import argparse
import json
import time
from collections import defaultdict

import torch
from bench_decode import graph_kernels, random_qwen3_8b
from bench_ops import copy_bandwidth

from dspark.models import ModelRunner
from dspark.ops import chain_layout


def time_ms(fn, budget_ms: float = 300.0) -> float:
    """GPU ms per call of ``fn`` (graph replays), back to back after two warm-up calls."""
    fn()
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    reps = int(max(5, min(50, budget_ms / max(start.elapsed_time(end), 1e-3))))
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def kernel_profile(fn, top: int = 12) -> dict:
    """The kernels of one call of ``fn`` (a graph replay): count, summed GPU µs, first start to
    last end, and the ``top`` names by summed µs."""
    kernels = graph_kernels(fn)
    per_name = defaultdict(float)
    for e in kernels:
        per_name[e.name[:60]] += e.device_time
    span = (max(e.time_range.end for e in kernels) - kernels[0].time_range.start
            if kernels else 0.0)  # (overlapping kernels: the last to start may not end last)
    return dict(kernels=len(kernels), kernel_us=round(sum(per_name.values()), 1),
                span_us=round(span, 1),
                top=[(n, round(us, 1)) for n, us in sorted(per_name.items(),
                                                           key=lambda kv: -kv[1])[:top]])


VARIANTS = {"fused": dict(fused=True, batch_invariant=True),
            "cublas": dict(fused=False, hybrid=False),
            "hybrid": dict(fused=False, hybrid=True)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--batches", default="1,2,4,8,16,32")
    ap.add_argument("--rows", default="4,8,16")
    ap.add_argument("--position", type=int, default=112)
    ap.add_argument("--slots", type=int, default=1024)
    ap.add_argument("--variants", default="fused,cublas,hybrid")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    model, read_bytes = random_qwen3_8b(a.layers)
    bw = copy_bandwidth()
    floor_ms = read_bytes / bw * 1e3
    print(f"device {torch.cuda.get_device_name()}, copy {bw / 1e9:.0f} GB/s, weights "
          f"{read_bytes / 1e9:.2f} GB, floor {floor_ms:.3f} ms", flush=True)
    rows, t0 = [], time.perf_counter()
    for B in map(int, a.batches.split(",")):
        decode = {}
        for variant in a.variants.split(","):
            runner = ModelRunner(model, **VARIANTS[variant])
            runner.allocate(B, a.slots)
            tok = torch.full((B,), 5, device="cuda")
            start = torch.full((B,), a.position, device="cuda")
            decode[variant] = time_ms(lambda: runner.decode(tok, start))
            rec = dict(B=B, W=1, rows=B, variant=variant, ms=round(decode[variant], 3))
            if a.profile:
                rec["profile"] = kernel_profile(lambda: runner.decode(tok, start))
            rows.append(rec)
            print(json.dumps({k: v for k, v in rec.items() if k != "profile"}), flush=True)
            for W in map(int, a.rows.split(",")):
                offsets, parents = chain_layout([W - 1] * B, device="cuda")
                draft = torch.randint(0, model.config.vocab_size, (B * W,), device="cuda")
                call = lambda: runner.forward_tree(draft, parents, offsets, start, W)  # noqa: E731
                ms = time_ms(call)
                rec = dict(B=B, W=W, rows=B * W, variant=variant, ms=round(ms, 3))
                if a.profile:
                    rec["profile"] = kernel_profile(call)
                rows.append(rec)
                print(json.dumps({k: v for k, v in rec.items() if k != "profile"}), flush=True)
            runner = None  # free the cache and graphs before the next variant
            torch.cuda.empty_cache()
        base = decode.get("fused", next(iter(decode.values())))
        for r in rows:
            if r["B"] == B:
                r["ratio_to_fused_decode"] = round(r["ms"] / base, 3)
                r["ratio_to_floor"] = round(r["ms"] / floor_ms, 3)
    variants = a.variants.split(",")
    print(f"\n{'B':>3} {'W':>3} {'rows':>5} | " + " | ".join(f"{v + ' ms':>10} {'x dec':>6}"
                                                       for v in variants) + " | fastest")
    by = {(r["B"], r["W"], r["variant"]): r for r in rows}
    for B, W in sorted({(r["B"], r["W"]) for r in rows}):
        got = {v: by[(B, W, v)] for v in variants if (B, W, v) in by}
        cells = [f"{got[v]['ms']:>10.3f} {got[v]['ratio_to_fused_decode']:>6.2f}" if v in got
                 else f"{'-':>10} {'-':>6}" for v in variants]
        fastest = min(got, key=lambda v: got[v]["ms"])
        print(f"{B:>3} {W:>3} {B * W:>5} | " + " | ".join(cells) + f" | {fastest}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_GBps=round(bw / 1e9),
                           floor_ms=round(floor_ms, 3), weight_read_GB=round(read_bytes / 1e9, 2),
                           position=a.position, slots=a.slots, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
