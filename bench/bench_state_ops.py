"""Microbenchmark of the step's bookkeeping on CUDA: dspark::commit_tokens and
dspark::ngram_propose next to the PyTorch code they replaced in the engine (dspark/reference.py:
the former SpecState.append + round log and NgramDrafter.propose), every variant replayed from a
CUDA graph.

Timing: one graph per variant, replays queued back to back with CUDA events around each, median
over --reps. The commit mutates the state, so n_tokens / active are restored before each replay,
outside the timed region. "launch floor" is a graph of one tiny kernel timed the same way: what
any graph of one kernel costs, so an op's own cost is its time minus that floor.
Contexts: n_tokens ~ U[C/4, C/2]; "periodic" token rows (a match within the last few hundred
tokens, the common case) and "random" rows over a 32000-token vocabulary (mostly no match: every
n-gram size scans the whole context, the worst case).

    python bench/bench_state_ops.py --out bench/results/<date>/bench_state_ops.json
"""
import argparse
import json
import sys
import time

import torch

import dspark
from dspark import reference
from dspark.timing import graph_replay_seconds

COMMIT = ["tokens", "n_tokens", "active", "out_tokens", "accept_count", "stop_tokens",
          "prompt_lens", "max_new", "round_active", "round_accepts", "rounds", "any_active"]


def median_replay_us(fn, reps, reset=None):
    """Median µs of one replay of a CUDA graph of fn(), replays queued back to back as inside
    a decode step's graph (dspark.timing.graph_replay_seconds; ``reset`` untimed)."""
    return graph_replay_seconds(fn, reps, reset=reset) * 1e6


def kernel_count(fn):
    """CUDA kernels one eager call launches (what a graph of it replays); None without CUPTI."""
    fn()
    torch.cuda.synchronize()
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    except RuntimeError:
        return None
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "memcpy" not in e.name.lower() and "memset" not in e.name.lower())


def make_state(B, C, W, pattern, gen):
    dev = "cuda"
    n = torch.randint(C // 4, C // 2, (B,), device=dev, generator=gen)
    if pattern == "periodic":
        period = torch.randint(50, 400, (B, 1), device=dev, generator=gen)
        base = torch.randint(0, 32000, (B, 400), device=dev, generator=gen)
        tokens = base.gather(1, torch.arange(C, device=dev)[None, :] % period)
    else:
        tokens = torch.randint(0, 32000, (B, C), device=dev, generator=gen)
    accept = torch.randint(0, W, (B,), device=dev, generator=gen)
    out = torch.randint(0, 32000, (B, W), device=dev, generator=gen)
    out = torch.where(torch.arange(W, device=dev)[None, :] > accept[:, None], -1, out)
    stop_tokens = torch.full((B, 4), -1, device=dev)
    stop_tokens[:, 0] = 2  # one stop token (an id the random tokens rarely hit), -1 padded
    return dict(tokens=tokens, n_tokens=n, active=torch.ones(B, dtype=torch.bool, device=dev),
                out_tokens=out, accept_count=accept, stop_tokens=stop_tokens,
                prompt_lens=n.clone(), max_new=torch.full((B,), C, device=dev),
                round_active=torch.zeros(64, B, dtype=torch.bool, device=dev),
                round_accepts=torch.zeros(64, B, dtype=torch.long, device=dev),
                rounds=torch.zeros((), dtype=torch.long, device=dev),
                any_active=torch.zeros((), dtype=torch.bool, device=dev))


def bench(B, C, W, pattern, reps):
    gen = torch.Generator(device="cuda").manual_seed(B)
    s = make_state(B, C, W, pattern, gen)
    n0, active0 = s["n_tokens"].clone(), s["active"].clone()

    def reset():
        s["n_tokens"].copy_(n0)
        s["active"].copy_(active0)

    args = [s[k] for k in COMMIT]
    got, want = [t.clone() for t in args], [t.clone() for t in args]
    torch.ops.dspark.commit_tokens(*got)
    reference.commit_tokens(*want)
    assert all(torch.equal(g, w) for g, w in zip(got, want)), "commit_tokens != reference"
    gamma = W - 1
    row = dict(B=B, C=C, W=W, pattern=pattern)
    row["commit_us"] = median_replay_us(lambda: torch.ops.dspark.commit_tokens(*args), reps, reset)
    row["commit_torch_us"] = median_replay_us(lambda: reference.commit_tokens(*args), reps, reset)

    def ngram():
        return torch.ops.dspark.ngram_propose(s["tokens"], s["n_tokens"], gamma, 3, 1)

    def ngram_torch():
        return reference.ngram_propose(s["tokens"], s["n_tokens"], gamma, 3, 1)

    reset()
    assert torch.equal(ngram(), ngram_torch()), "ngram_propose != reference"
    row["ngram_us"] = median_replay_us(ngram, reps)
    row["ngram_torch_us"] = median_replay_us(ngram_torch, reps)
    row["commit_torch_kernels"] = kernel_count(lambda: reference.commit_tokens(*args))
    row["ngram_torch_kernels"] = kernel_count(ngram_torch)
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", default="1,8,64,256")
    ap.add_argument("--C", type=int, default=2048)
    ap.add_argument("--W", type=int, default=8)
    ap.add_argument("--reps", type=int, default=500)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    assert torch.cuda.is_available() and dspark.cuda_available(), "needs a GPU and a CUDA build"
    tiny = torch.zeros(1, device="cuda")
    floor = median_replay_us(lambda: tiny.add_(1), args.reps)
    print(f"device {torch.cuda.get_device_name()}  launch floor (one graphed kernel) "
          f"{floor:.2f} us", flush=True)
    rows = []
    with dspark.ops.sync_checks(False):
        for pattern in ("periodic", "random"):
            for B in map(int, args.B.split(",")):
                rows.append(bench(B, args.C, args.W, pattern, args.reps))
                print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           date=time.strftime("%Y-%m-%d"), launch_floor_us=round(floor, 2),
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
