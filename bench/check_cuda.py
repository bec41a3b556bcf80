"""CUDA == CPU token identity over random batches (run on the GPU machine; the pytest suite
covers the same with the `device` fixture, this script gives a quick count and a sanitizer
target). Exit code 1 on any mismatch.

    python bench/check_cuda.py [--cases 200] [--small]
"""
import argparse
import random
import sys

import torch


def random_case(rng, small, vocab=None):
    R = rng.choice([1, 3, 8] if small else [1, 3, 17, 64])
    V = vocab or rng.choice([1, 7, 100] if small else [1, 7, 1000, 4097, 32003])
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
    tree = rng.random() < 0.4
    counts, parents = [], []
    for _ in range(R):
        n = rng.randint(1, 9)
        counts.append(n)
        for j in range(n):
            parents.append(-1 if j == 0 else (rng.randrange(j) if tree else j - 1))
    N = sum(counts)
    offsets = torch.tensor([0] + counts).cumsum(0)
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    logits = (torch.randn(N, V, generator=g) * rng.choice([0.5, 3, 10])).to(dtype)
    if rng.random() < 0.3:
        logits[torch.rand(N, V, generator=g) < 0.3] = -float("inf")
        logits[:, 0] = 0.0  # keep every row non-empty
    mode = rng.choice(["none", "f32", "f64"])
    q = None
    if mode != "none":
        q = torch.softmax(torch.randn(N, V, generator=g) * 2, -1)
        q = q.to(torch.float64 if mode == "f64" else torch.float32)
        if rng.random() < 0.3:
            q[:, : max(1, V // 3)] = 0.0
    tokens = torch.randint(0, V, (N,), generator=g)
    if rng.random() < 0.5:  # make many drafts agree with the target argmax so paths get long
        agree = torch.rand(N, generator=g) < 0.7
        tokens = torch.where(agree, logits.float().argmax(-1).roll(1), tokens)
    temp = torch.tensor([rng.choice([0.0, 0.5, 1.0, 1.5]) for _ in range(R)], dtype=torch.float32)
    top_k = torch.tensor([rng.choice([0, 0, 1, 5, 50]) for _ in range(R)], dtype=torch.int64)
    top_p = torch.tensor([rng.choice([1.0, 1.0, 0.9, 0.5]) for _ in range(R)], dtype=torch.float32)
    keyed = rng.random() < 0.5
    if keyed:
        extra = dict(seeds=torch.randint(0, 1 << 40, (R,), generator=g),
                     positions=torch.randint(0, 5000, (R,), generator=g), uniforms=None)
    else:
        extra = dict(seeds=None, positions=None,
                     uniforms=torch.rand(N, 2, generator=g, dtype=torch.float64))
    args = (logits, offsets, tokens, torch.tensor(parents), q, temp, top_k, top_p,
            extra["seeds"], extra["positions"], extra["uniforms"], max(counts) + rng.randint(0, 2))
    return args


def to(args, dev):
    return tuple(a.to(dev) if isinstance(a, torch.Tensor) else a for a in args)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--vocab", type=int, default=None, help="every case at this V")
    a = ap.parse_args()
    rng = random.Random(0)
    bad = 0
    for i in range(a.cases):
        args = random_case(rng, a.small, a.vocab)
        cpu = torch.ops.dspark.verify(*args)
        gpu = torch.ops.dspark.verify(*to(args, "cuda"))
        same = all(torch.equal(x, y.cpu()) for x, y in zip(cpu, gpu))
        logits, temp, top_k, top_p = args[0], args[5], args[6], args[7]
        R = len(temp)
        rows = logits[args[1][:-1]]
        root_u = None if args[10] is None else args[10][args[1][:-1], 1]
        sample_args = (rows, temp, top_k, top_p, args[8], args[9], root_u)
        s_cpu = torch.ops.dspark.sample(*sample_args, True)
        s_gpu = torch.ops.dspark.sample(*to(sample_args, "cuda"), True)
        same_s = torch.equal(s_cpu[0], s_gpu[0].cpu()) and torch.allclose(
            s_cpu[1], s_gpu[1].cpu(), rtol=1e-12, atol=1e-15)
        if not (same and same_s):
            bad += 1
            print(f"case {i}: verify same={same} sample same={same_s} R={R} V={logits.shape[1]} "
                  f"dtype={logits.dtype}")
            if not same:
                print(" cpu", [x.tolist() for x in cpu[:2]])
                print(" gpu", [x.tolist() for x in gpu[:2]])
    print(f"check_cuda: {a.cases - bad} passed, {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
