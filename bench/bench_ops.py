"""Microbenchmarks of dspark::verify and dspark::sample on CUDA (median µs), beside their bytes
floor and the anchors measured on the H200 (../shared/docs/kernel-anchors.md).

For each logits dtype and chain shape (R requests, gamma drafts, V = 151936) it times:
  greedy   verify at T = 0, no draft_probs
  sampled  verify at T = 1 with fp32 draft_probs (drafts sampled from a perturbed target)
  sample   sample over the same R * (gamma + 1) rows, at T = 0 and at T = 1
for each CUDA implementation asked for (--impls fused,staged: the A/B switch
dspark.ops._verify_impl), and the plain-PyTorch chain verifier with --torch.

Timing: the op captured in a CUDA graph, CUDA events around each replay, median over --reps;
L2 cold: a 256 MiB read before every replay (outside the timed region). Floor: the bytes the op
must read (every logits row once; a draft-probability row where a request rejects) at the copy
bandwidth measured in the same run (read + write counted, like the anchors). "launch floor": a
graph of one tiny kernel timed the same way (flush included): what any graphed op costs here
before its own work, and the part of each time below (and of the anchors') that no kernel
change removes. --chain N adds "in graph" times: N calls captured in one graph, each on its own
copy of the inputs (copies that together exceed the L2, so calls start mostly cold), the replay's
median divided by N: what a call costs inside an engine step's graph, without the replay's own
launch.

    python bench/bench_ops.py --out bench/results.json
    python bench/bench_ops.py --R 64 --gamma 7 --dtypes bf16 --impls fused --nvtx   # under nsys
"""
import argparse
import json
import statistics
import sys
import time

import torch
from torch_baseline import chain_verify_torch

import dspark
from dspark.timing import capture_graph

L2_BYTES = 60 << 20
FLUSH_BYTES = 256 << 20

# kernel-anchors.md, "Side by side with dspark on the H200 (2026-12-02)": fp32 inputs, V = 151936,
# median µs of CUDA-graph replays (FlashInfer: direct launch), L2 flushed. probs-in anchors read
# probabilities, logits-in ones logits (like ours).
ANCHORS = {  # (R, gamma): FlashInfer chain, vLLM probs-in, vLLM logits-in, PyTorch, vLLM greedy
    (1, 1): (58.8, 106.7, 145.5, 119.6, 17.2), (1, 4): (64.2, 108.8, 149.0, 120.5, 17.4),
    (1, 7): (64.6, 109.6, 151.9, 121.4, 18.3), (8, 1): (73.9, 115.0, 158.6, 142.2, 18.5),
    (8, 4): (80.5, 122.8, 188.9, 147.3, 26.5), (8, 7): (82.7, 128.7, 225.2, 161.1, 34.0),
    (64, 1): (98.4, 171.7, 282.3, 399.3, 36.0), (64, 4): (103.7, 185.7, 538.1, 547.4, 73.5),
    (64, 7): (106.1, 316.7, 933.4, 621.3, 98.8),
}
ANCHOR_NAMES = ("flashinfer_probs", "vllm_probs", "vllm_logits", "torch_logits", "vllm_greedy")
# Issue 13's targets (bf16 logits, H200, L2 cold, median): greedy, sampled (T = 1, q given).
TARGETS = {(1, 1): (10, 15), (1, 4): (10, 15), (1, 7): (10, 15), (8, 7): (20, 30),
           (64, 7): (60, 90)}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


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


def capture(make_fn, inputs):
    """One CUDA graph of make_fn(inputs), captured after a warm-up call on a side stream."""
    return capture_graph(lambda: make_fn(inputs))[0]


def time_graph(make_fn, copies, reps, flush=None, label=None):
    """Median µs per replay of make_fn's graph (one per input copy, replayed round-robin).
    flush: a tensor read before every replay (outside the timed region) so that replays start
    with a cold L2. label: an NVTX range around the timed replays."""
    graphs = [capture(make_fn, c) for c in copies]
    for g in graphs:
        g.replay()
    torch.cuda.synchronize()
    marks = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
             for _ in range(reps)]
    if label:
        torch.cuda.nvtx.range_push(label)
    for i, (s, e) in enumerate(marks):
        if flush is not None:
            flush.amax()
        s.record()
        graphs[i % len(graphs)].replay()
        e.record()
    torch.cuda.synchronize()
    if label:
        torch.cuda.nvtx.range_pop()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in marks)


def make_inputs(R, gamma, V, greedy, seed, dtype=torch.bfloat16):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    N = R * (gamma + 1)
    logits = (torch.randn(N, V, device="cuda", generator=gen) * 4).to(dtype)
    temp = 0.0 if greedy else 1.0
    params = dspark.ops.sampling_tensors(N, temp, 0, 1.0, device="cuda")
    # Drafts: sample each node's token from a perturbed copy of the target row it should match.
    draft_logits = logits.float() + torch.randn(N, V, device="cuda", generator=gen) * 1.5
    shift = torch.roll(draft_logits.view(R, gamma + 1, V), 1, dims=1).reshape(N, V)
    del draft_logits
    toks, q = dspark.ops.sample(shift, params, torch.arange(N, device="cuda"),
                                torch.zeros(N, dtype=torch.long, device="cuda"),
                                return_probs=not greedy)
    del shift
    offsets, parents = dspark.ops.chain_layout([gamma] * R, device="cuda")
    req = dspark.ops.sampling_tensors(R, temp, 0, 1.0, device="cuda")
    return dict(logits=logits, offsets=offsets, tokens=toks, parents=parents,
                q=None if greedy else q.float(), params=req,
                seeds=torch.arange(R, device="cuda"),
                positions=torch.full((R,), 100, device="cuda"),
                uniforms=torch.rand(R, gamma + 1, device="cuda", generator=gen),
                row_params=dspark.ops.sampling_tensors(N, temp, 0, 1.0, device="cuda"),
                row_seeds=torch.arange(N, device="cuda"))


def chain_copies(c, chain):
    """Enough copies of case c's tensors for a chain of calls to start mostly L2-cold: at least
    `chain`, and together more than 2x the L2."""
    nbytes = sum(t.numel() * t.element_size() for t in c.values() if torch.is_tensor(t))
    n = max(chain, -(-2 * L2_BYTES // max(nbytes, 1)))
    return [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in c.items()}
            for _ in range(n)]


def time_chain(fn, copies, reps, flush):
    """Median µs per call of len(copies) calls of fn captured in one graph (one per copy)."""
    return time_graph(lambda cs: [fn(x) for x in cs], [copies], reps, flush) / len(copies)


def bench_case(R, gamma, V, dtype, greedy, impls, reps, bw, flush, nvtx, with_torch, chain=0):
    c = make_inputs(R, gamma, V, greedy, seed=R * 100 + gamma, dtype=dtype)
    W = gamma + 1
    mode = "greedy" if greedy else "sampled"
    tag = f"{mode} R{R} g{gamma} {str(dtype)[6:]}"

    def verify(c):
        return torch.ops.dspark.verify(c["logits"], c["offsets"], c["tokens"], c["parents"], c["q"],
                                       *c["params"], c["seeds"], c["positions"], None, W)

    def sample(c):  # one draw per logits row, same temperature
        return torch.ops.dspark.sample(c["logits"], *c["row_params"], c["row_seeds"],
                                       c["row_seeds"], None, False)

    count = verify(c)[1]
    rejecting = int((count < gamma).sum())
    nbytes = R * W * V * c["logits"].element_size() + (0 if greedy else rejecting * V * 4)
    row = dict(dtype=str(dtype)[6:], mode=mode, R=R, gamma=gamma, V=V,
               floor_us=round(nbytes / bw * 1e6, 2),
               mean_accepted=round(float(count.float().mean()), 2))
    for impl in impls:
        with dspark.ops._verify_impl(impl):
            row[f"verify_us_{impl}"] = round(time_graph(
                verify, [c], reps, flush, nvtx and f"verify {impl} {tag}"), 2)
            row[f"sample_us_{impl}"] = round(time_graph(
                sample, [c], reps, flush, nvtx and f"sample {impl} {tag}"), 2)
            if chain:
                copies = chain_copies(c, chain)
                row[f"verify_us_in_graph_{impl}"] = round(time_chain(verify, copies, reps, flush),
                                                          2)
                del copies
    if with_torch:
        def baseline(c):
            return chain_verify_torch(c["logits"], c["tokens"].view(R, W)[:, 1:], c["q"],
                                      c["params"].temperature, gamma, c["uniforms"])
        row["torch_us"] = round(time_graph(baseline, [c], reps, flush), 2)
    row["verify_us"] = row[f"verify_us_{impls[0]}"]
    row["pct_floor"] = round(100 * row["floor_us"] / row["verify_us"], 1)
    anchors = ANCHORS.get((R, gamma))
    if anchors:
        row["anchors_us"] = dict(zip(ANCHOR_NAMES, anchors))
    target = TARGETS.get((R, gamma))
    if target:
        row["target_us"] = target[0 if greedy else 1]
    del c
    torch.cuda.empty_cache()
    return row


def print_table(rows, impls):
    head = (f"{'dtype':5} {'mode':7} {'R':>3} {'g':>2} {'floor':>6} "
            + " ".join(f"{'v_' + i:>9}" for i in impls) + " "
            + " ".join(f"{'s_' + i:>9}" for i in impls)
            + f" {'s/greedy':>8} {'target':>6}  anchors (µs, fp32 in, kernel-anchors.md)")
    print(head)
    greedy_us = {(r["dtype"], r["R"], r["gamma"]): r["verify_us"] for r in rows
                 if r["mode"] == "greedy"}
    for r in rows:
        a = r.get("anchors_us", {})
        if r["mode"] == "greedy":
            anchor = f"vLLM greedy {a['vllm_greedy']}" if a else ""
        else:
            anchor = (f"FlashInfer {a['flashinfer_probs']} | vLLM probs {a['vllm_probs']} | "
                      f"vLLM logits {a['vllm_logits']} | torch {a['torch_logits']}") if a else ""
        g = greedy_us.get((r["dtype"], r["R"], r["gamma"]))
        ratio = f"{r[f'sample_us_{impls[0]}'] / g:.2f}x" if g else ""
        print(f"{r['dtype']:5} {r['mode']:7} {r['R']:>3} {r['gamma']:>2} {r['floor_us']:>6} "
              + " ".join(f"{r[f'verify_us_{i}']:>9}" for i in impls) + " "
              + " ".join(f"{r[f'sample_us_{i}']:>9}" for i in impls)
              + f" {ratio:>8} {str(r.get('target_us', '')):>6}  {anchor}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--R", default="1,8,64")
    ap.add_argument("--gamma", default="1,4,7")
    ap.add_argument("--V", type=int, default=151936)
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--impls", default="fused,staged", help="A/B: dspark.ops._verify_impl names")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--warm", action="store_true", help="no L2 flush between replays")
    ap.add_argument("--torch", action="store_true", help="also time the plain-PyTorch verifier")
    ap.add_argument("--nvtx", action="store_true", help="NVTX ranges around each timed op")
    ap.add_argument("--chain", type=int, default=0,
                    help="also time verify as N calls in one graph (per-call, in-graph cost)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    assert torch.cuda.is_available() and dspark.cuda_available(), "needs a GPU and a CUDA build"
    impls = args.impls.split(",")
    bw = copy_bandwidth()
    flush = None if args.warm else torch.zeros(FLUSH_BYTES // 4, device="cuda")
    tiny = torch.zeros(1, device="cuda")
    floor = time_graph(lambda _: tiny.add_(1), [None], args.reps, flush)
    print(f"device {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e9:.0f} GB/s (r+w)  "
          f"L2 {'warm' if args.warm else 'cold'}  impls {impls}  launch floor (a graph of one "
          f"tiny kernel, timed the same way) {floor:.2f} us", flush=True)
    print("ncu recipe: ncu --set full --graph-profiling node -k regex:FusedVerifyKernel -c 4 "
          "-o verify_fused python bench/bench_ops.py --R 64 --gamma 7 --dtypes bf16 "
          "--impls fused --reps 2   (staged: -k regex:'RowStats|Walk|Residual|Draw')",
          flush=True)
    rows = []
    for name in args.dtypes.split(","):
        for greedy in (True, False):
            for R in map(int, args.R.split(",")):
                for g in map(int, args.gamma.split(",")):
                    rows.append(bench_case(R, g, args.V, DTYPES[name], greedy, impls, args.reps,
                                           bw, flush, args.nvtx, args.torch, args.chain))
                    print(json.dumps(rows[-1]), flush=True)
    print_table(rows, impls)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_GBps=bw / 1e9,
                           date=time.strftime("%Y-%m-%d"), l2="warm" if args.warm else "cold",
                           launch_floor_us=round(floor, 2), rows=rows), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
