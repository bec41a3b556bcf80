"""What a scheduled verify saves and what the sync mode's host read costs (dspark/schedule_step.py).

For R requests with gamma drafts each and a mix of verify lengths l_r (mean --mean-ell):
- "padded": the runner's forward over every draft (R * (gamma + 1) rows: what a bound on the
  row count without reading it would have to verify);
- "packed": the forward over the N = sum(l_r + 1) admitted rows only (+ one scratch row);
- "read": reading N on the host after the scheduling op (sync / threshold mode's one host sync
  per step; on CPU a plain read, on GPU the round trip of a queued kernel's result).
CPU: eager calls timed on the host, the least of --reps (a shared CPU's load only ever adds
time); CUDA: graph replays (dspark.timing, median). Model: a random
Qwen3 of --hidden x --layers (MLP 3 x hidden, head dim 64, vocab 2048).

    OMP_NUM_THREADS=1 python bench/bench_sched_step.py --requests 8 32 64 --gamma 7 [--device cuda]
        [--out F.json]
"""
import argparse
import json
import time

import torch

import dspark
from dspark.models import ModelConfig, ModelRunner
from dspark.models.random import random_transformer
from dspark.timing import graph_replay_seconds


def host_seconds(fn, reps):
    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, nargs="+", default=[8, 32, 64])
    p.add_argument("--gamma", type=int, default=7)
    p.add_argument("--mean-ell", type=float, default=2.0)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dev = torch.device(args.device)
    h = args.hidden
    cfg = ModelConfig.from_dict(dict(
        model_type="qwen3", vocab_size=2048, hidden_size=h, intermediate_size=3 * h,
        num_hidden_layers=args.layers, num_attention_heads=h // 64,
        num_key_value_heads=max(1, h // 256), head_dim=64, max_position_embeddings=4096))
    model = random_transformer(cfg, 0).to(dev, getattr(torch, args.dtype))
    runner = ModelRunner(model, use_cuda_graphs=False)
    W = args.gamma + 1
    cuda = dev.type == "cuda"
    timed = (lambda fn: graph_replay_seconds(fn, args.reps * 10)) if cuda else (
        lambda fn: host_seconds(fn, args.reps))
    rows = []
    for R in args.requests:
        gen = torch.Generator().manual_seed(R)
        # l_r ~ geometric-ish around the mean, clamped to [0, gamma]
        ell = torch.poisson(torch.full((R,), args.mean_ell), generator=gen).clamp(max=args.gamma)
        ell = ell.long().tolist()
        runner.allocate(R, args.context + W + 1)
        start = torch.full((R,), args.context, device=dev)
        full_off, full_par = dspark.ops.chain_layout([args.gamma] * R, dev)
        tokens = torch.randint(0, 2048, (R * W,), generator=gen).to(dev)
        off, par = dspark.ops.chain_layout(ell, dev)
        N = int(off[-1])
        keep = torch.cat([torch.arange(r * W, r * W + n + 1) for r, n in enumerate(ell)]).to(dev)
        scratch = torch.zeros(1, dtype=torch.int64, device=dev)
        packed_tok, packed_par = torch.cat([tokens[keep], scratch]), torch.cat([par, scratch])
        padded = timed(lambda: runner.forward_tree(tokens, full_par, full_off, start, W))
        packed = timed(lambda: runner.forward_tree(packed_tok, packed_par, off, start, W, (),
                                                   True))
        c = torch.rand(R, args.gamma, generator=gen).to(dev)
        lengths = torch.full((R,), args.gamma, device=dev)
        sps = torch.tensor([1.0 / (1 + 0.01 * b) for b in range(1, R * W + 1)], device=dev)

        def read():
            ell_dev = dspark.ops.schedule_prefix(c, lengths, sps, "sync")
            return int(ell_dev.sum())
        bare = host_seconds(lambda: dspark.ops.schedule_prefix(c, lengths, sps, "sync"),
                            args.reps * 20)
        with_read = host_seconds(read, args.reps * 20)
        row = dict(requests=R, gamma=args.gamma, rows_padded=R * W, rows_packed=N + 1,
                   padded_ms=padded * 1e3, packed_ms=packed * 1e3,
                   schedule_us=bare * 1e6, schedule_and_read_us=with_read * 1e6)
        rows.append(row)
        print(f"R {R:4d}: forward padded {R * W:5d} rows {padded * 1e3:8.2f} ms | packed "
              f"{N + 1:5d} rows {packed * 1e3:8.2f} ms ({packed / padded:.2f}x) | schedule op "
              f"{bare * 1e6:6.1f} us, + host read of N {with_read * 1e6:6.1f} us", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=str(dev), rows=rows, args=vars(args)), f, indent=1)


if __name__ == "__main__":
    main()
