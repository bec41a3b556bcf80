"""Microbenchmark of dspark::markov_draft (DSpark's sequential draft stage) on CUDA against its
roofline and against the Python loop it replaces; optionally the whole DSpark draft step at the
Qwen3-8B shape next to its backbone forward.

Roofline (what the op must read): U once (R x gamma x V in U's dtype), W2 once per step
(gamma x rank x V in the weights' dtype: 78 MB at rank 256, V = 151936, bf16 -- larger than L2,
so it streams from HBM every step) and the W1 rows (R x gamma x rank), at the measured device
copy bandwidth (read + write, as bench_ops.py). The bias is rank FMAs per (row, entry) on fp32
CUDA cores (one summation order, the same bits as the CPU): "fma_floor_us" is that count at
the card's fp32 FMA rate, the compute floor, which exceeds the byte floor at R = 64.
Variants, each replayed from a CUDA graph (inputs rotated past L2): "op" (tokens and confidence
logits), "op_probs" (+ q rows [R, gamma, V] f64, what the engine's drafter asks for today) and
"loop" (the drafter's former Python loop: gather + nn.Linear GEMM + dspark::sample per step).

    python bench/bench_markov_draft.py --out bench/results/<date>/bench_markov_draft.json
    python bench/bench_markov_draft.py --R 1 --draft-step      # + whole draft step at R = 1
    python bench/bench_markov_draft.py --R 64 --nvtx            # NVTX ranges for nsys / ncu

ncu (one replay of each kernel; the logits kernel is the one to read: achieved DRAM bandwidth,
FMA pipe utilisation, stall reasons):
    ncu --set full --nvtx --nvtx-include "markov_draft/" -k regex:Markov --launch-count 3 \\
        -o markov_R64 python bench/bench_markov_draft.py --R 64 --reps 3 --nvtx --variants op
"""
import argparse
import contextlib
import json
import sys
import time
import types

import torch
import torch.nn.functional as F
from bench_ops import L2_BYTES, copy_bandwidth, time_graph

import dspark

FMA_PER_SM_CLOCK = 128  # fp32 lanes per SM (Hopper)


def make_inputs(R, G, V, rank, d, wdt, udt, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape, scale=1.0, dtype=wdt):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(dtype)
    params = dspark.ops.sampling_tensors(R, 1.0, 0, 1.0, device="cuda")
    return dict(U=rnd(R, G, V, scale=3.0, dtype=udt), anchors=torch.randint(
        0, V, (R,), device="cuda", generator=gen), w1=rnd(V, rank), w2=rnd(rank, V, scale=0.1),
        hidden=rnd(R, G, d), conf_w=rnd(d + rank, scale=0.02), conf_b=rnd(1), params=params,
        seeds=torch.arange(R, device="cuda"), positions=torch.full((R,), 1000, device="cuda"))


def op(c, return_probs):
    return torch.ops.dspark.markov_draft(c["U"], c["anchors"], c["w1"], c["w2"], c["hidden"],
                                         c["conf_w"], c["conf_b"], *c["params"], c["seeds"],
                                         c["positions"], return_probs)


def python_loop(c):
    """The drafter's former sequential stage: per step a W1 gather, the bias GEMM (nn.Linear on
    W2 [V, rank]), the confidence linear, and dspark::sample with the exact q rows."""
    prev, G = c["anchors"], c["U"].shape[1]
    toks, probs = [], []
    for k in range(G):
        e = F.embedding(prev, c["w1"])
        z = c["U"][:, k].float() + F.linear(e, c["w2_t"]).float()
        F.linear(torch.cat([c["hidden"][:, k], e], -1), c["conf_w"][None], c["conf_b"])
        tok, q = dspark.ops.sample(z, c["params"], c["seeds"], c["positions"] + k,
                                   return_probs=True)
        toks.append(tok)
        probs.append(q)
        prev = tok
    return torch.stack(toks, 1), torch.stack(probs, 1)


def bench_case(R, G, V, rank, d, wdt, udt, variants, reps, bw, nvtx):
    per_copy = R * G * V * udt.itemsize
    n_copies = max(1, min(4, 2 * L2_BYTES // per_copy + 1))
    copies = [make_inputs(R, G, V, rank, d, wdt, udt, s) for s in range(n_copies)]
    for c in copies[1:]:  # one set of weights (78 MB: past L2 anyway), rotated U and anchors
        c.update(w1=copies[0]["w1"], w2=copies[0]["w2"])
    if "loop" in variants:
        w2_t = copies[0]["w2"].t().contiguous()  # nn.Linear's layout [V, rank]
        for c in copies:
            c["w2_t"] = w2_t
    fns = {"op": lambda c: op(c, False), "op_probs": lambda c: op(c, True), "loop": python_loop}
    row = dict(R=R, gamma=G, V=V, rank=rank, weights=str(wdt)[6:], base_logits=str(udt)[6:])
    nbytes = R * G * V * udt.itemsize + G * rank * V * wdt.itemsize + R * G * rank * wdt.itemsize
    floor_us = nbytes / bw * 1e6
    props = torch.cuda.get_device_properties(0)
    clock_ghz = getattr(props, "clock_rate", 1980000) / 1e6  # kHz; Hopper boost if unknown
    fma_us = R * G * V * rank / (props.multi_processor_count * FMA_PER_SM_CLOCK * clock_ghz * 1e3)
    row.update(roofline_MB=round(nbytes / 1e6, 1), floor_us=round(floor_us, 1),
               fma_floor_us=round(fma_us, 1))
    for name in variants:
        rng = torch.cuda.nvtx.range(f"markov_draft/{name}/R{R}") if nvtx else \
            contextlib.nullcontext()
        with rng:
            t = time_graph(fns[name], copies, reps)
        row[f"{name}_us"] = round(t, 1)
        if name == "op":
            row["op_GBps"] = round(nbytes / t / 1e3, 1)
            row["pct_roofline"] = round(100 * floor_us / t, 1)
            row["pct_of_max_floor"] = round(100 * max(floor_us, fma_us) / t, 1)
    if "loop" in variants and "op_probs" in variants:
        row["speedup_vs_loop"] = round(row["loop_us"] / row["op_probs_us"], 2)
    return row


def draft_step_case(G, rank, reps, context=1024):
    """R = 1 at the Qwen3-8B shape (5 draft layers, d = 4096, V = 151936, bf16): the backbone
    forward (draft_hidden), + the LM head, and the whole propose with the op / the Python loop."""
    from dspark.drafters import DrafterSpec, make_drafter
    from dspark.drafters.dspark_drafter import ParallelDraftModel
    from dspark.models import ModelConfig
    from dspark.state import SpecState
    from dspark.timing import graph_replay_seconds
    cfg = ModelConfig.from_dict(dict(
        model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
        num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=8192, rope_theta=1e6, eos_token_id=None))
    spec = DrafterSpec.for_target(cfg, "dspark", gamma=G, mask_token_id=151669, markov_rank=rank)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"), torch.no_grad():
        model = ParallelDraftModel(spec).eval().requires_grad_(False)
        weight = types.SimpleNamespace
        target = types.SimpleNamespace(  # what attach_target reads: config, embedding, LM head
            config=cfg, embed=weight(weight=torch.randn(cfg.vocab_size, 4096) * 0.02),
            lm_head=weight(weight=torch.randn(cfg.vocab_size, 4096) * 0.02))
    torch.set_default_dtype(torch.float32)
    model.attach_target(target)
    drafter = make_drafter(model)
    state = SpecState.allocate(1, context + 64, 1, "cuda")
    state.reset([[1] * context], [32], [[]], dspark.ops.sampling_tensors(1, 1.0), [0])
    drafter.setup(1, context + 64)
    m = drafter.model
    out = dict(R=1, gamma=G, rank=rank, context=context)
    out["backbone_us"] = graph_replay_seconds(lambda: drafter.draft_hidden(state), reps) * 1e6
    out["backbone_lm_head_us"] = graph_replay_seconds(
        lambda: m.head_logits(drafter.draft_hidden(state)), reps) * 1e6
    for fused in (True, False):
        drafter.markov_op = fused
        t = graph_replay_seconds(lambda: drafter.propose(state), reps) * 1e6
        out["propose_op_us" if fused else "propose_loop_us"] = t
    out = {k: round(v, 1) if isinstance(v, float) else v for k, v in out.items()}
    out["op_step_over_backbone"] = round(out["propose_op_us"] / out["backbone_us"], 2)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--R", default="1,8,64")
    ap.add_argument("--gamma", type=int, default=7)
    ap.add_argument("--V", type=int, default=151936)
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--weights", default="bfloat16")
    ap.add_argument("--base-logits", default="bfloat16,float32")
    ap.add_argument("--variants", default="op,op_probs,loop")
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--draft-step", action="store_true")
    ap.add_argument("--nvtx", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    assert torch.cuda.is_available() and dspark.cuda_available(), "needs a GPU and a CUDA build"
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e9:.0f} GB/s (r+w)",
          flush=True)
    wdt = getattr(torch, args.weights)
    rows = []
    for udt in [getattr(torch, u) for u in args.base_logits.split(",")]:
        if udt not in (torch.float32, wdt):
            continue
        for R in map(int, args.R.split(",")):
            rows.append(bench_case(R, args.gamma, args.V, args.rank, args.hidden, wdt, udt,
                                   args.variants.split(","), args.reps, bw, args.nvtx))
            print(json.dumps(rows[-1]), flush=True)
    step = draft_step_case(args.gamma, args.rank, args.reps) if args.draft_step else None
    if step:
        print(json.dumps(step), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_GBps=bw / 1e9,
                           date=time.strftime("%Y-%m-%d"), rows=rows, draft_step=step), f,
                      indent=1)


if __name__ == "__main__":
    sys.exit(main())
