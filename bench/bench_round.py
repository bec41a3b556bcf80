"""Cost of a speculative round against a decode step, on the shipped demo pair (GPU).

Per prompt (batch 1 unless --batch), greedy: the engine's autoregressive baseline and speculative
decoding with each drafter, all on one runner. Each drafter runs twice: as the engine runs on GPU
(a step = one CUDA graph) and as ``<name>/stages`` (a graph per stage, timed apart by CUDA
events: the per-stage split, at the cost of the extra launches). Reported per run: tau, the wall
time per round and per decode step (decode time = total minus prefill, over rounds), their
ratio, the stage times, tokens/s and the speedup, and whether the greedy outputs are identical.

    python bench/bench_round.py [--dataset humaneval.jsonl] [--prompts 16] [--new 128]
                                [--dtype bfloat16] [--batch 1] [--drafters dspark,ngram]
"""
import argparse
import json
import time

import torch

from dspark.demo import DEMO_PROMPTS, load_demo_pair
from dspark.drafters import NgramDrafter, ParallelDrafter
from dspark.engine import SpeculativeEngine
from dspark.models import ModelRunner
from dspark.train.data import read_records


def prompts_from(path, tokenizer, n):
    texts = [r["turns"][0] for r in read_records([path])] if path else list(DEMO_PROMPTS)
    ids = [tokenizer.encode(t).ids[-192:] for t in texts]  # the tail: what the model continues
    return [ids[i % len(ids)] for i in range(n)]


def run(engine, fn_name, prompts, batch, new):
    """Generate all prompts in batches; per-call metrics summed."""
    fn = getattr(engine, fn_name)
    out, rounds, decode_s, stages, tokens = [], 0, 0.0, {}, 0
    for i in range(0, len(prompts), batch):
        g = fn(prompts[i:i + batch], max_new_tokens=new, temperature=0.0, stop_tokens=[])
        m = g.metrics
        out += g.tokens
        rounds += m.rounds
        decode_s += m.total_s - m.prefill_s
        tokens += m.new_tokens
        for k in ("draft_s", "schedule_s", "target_forward_s", "accept_s", "commit_s", "step_s",
                  "other_s"):  # step_s: a whole-step graph's time (stage_times off)
            stages[k] = stages.get(k, 0.0) + getattr(m, k)
        if m.speculative:
            stages.setdefault("hist", [0] * len(m.accept_hist))
            stages["hist"] = [a + b for a, b in zip(stages["hist"], m.accept_hist)]
    return out, rounds, decode_s, stages, tokens


def round_kernels(engine, fn_name, prompts, new):
    """One more call under torch.profiler: the graph replays of the most common kernel count
    (the rounds, or the decode steps; not prefill), the one of median span summarized."""
    import tempfile
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    from dspark.profiling import graph_replays, replay_summary

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        getattr(engine, fn_name)(prompts, max_new_tokens=new, temperature=0.0, stop_tokens=[])
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/trace.json"
        prof.export_chrome_trace(path)
        replays = graph_replays(path)
    if not replays:
        return {"kernels": 0, "span_us": 0.0, "busy_us": 0.0, "top": [], "replays": 0}
    count = Counter(len(r) for r in replays).most_common(1)[0][0]
    same = sorted((r for r in replays if len(r) == count),
                  key=lambda r: max(t + d for _, t, d in r))
    summary = replay_summary(same[len(same) // 2], top=15, sequence=True)
    summary["replays"] = len(same)
    return summary


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default=None, help="DeepSpec jsonl ({'turns': [...]})")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--drafters", default="dspark,ngram", help="of dspark, dspark-compiled, ngram")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes (after one warm-up)")
    ap.add_argument("--eager-stages", action="store_true", help="run the engine's step stages "
                    "eagerly (only the target forward replays a graph): the cost before stage "
                    "graphs")
    ap.add_argument("--no-split", action="store_true", help="skip the per-stage runs (a "
                    "graph per stage, timed apart) after each one-graph-per-step run")
    ap.add_argument("--kernels", action="store_true", help="then profile one more call per "
                    "one-graph-per-step run (torch.profiler): the kernels of its typical graph "
                    "replay (a round, or a decode step): count, span, summed time, the top ones")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    target, tok, dspark_drafter = load_demo_pair("cuda")
    target = target.to(dtype)
    dspark_drafter.model.to(dtype)
    dspark_drafter.model.attach_target(target)
    runner = ModelRunner(target)
    prompts = prompts_from(args.dataset, tok, args.prompts)
    compiled = ParallelDrafter(dspark_drafter.model, dspark_drafter.gamma)
    compiled.compile()  # the same drafter with its backbone and context write under inductor
    drafters = {"dspark": dspark_drafter, "dspark-compiled": compiled,
                "ngram": NgramDrafter(gamma=4, max_ngram=3)}
    rows = {}
    ar_engine = SpeculativeEngine(runner)
    cases = [("autoregressive", ar_engine, "generate_autoregressive")]
    for n in args.drafters.split(","):  # one graph per step (speed), then per stage (the split)
        cases.append((n, SpeculativeEngine(runner, drafters[n], stage_times=False), "generate"))
        if not args.no_split:
            cases.append((f"{n}/stages", SpeculativeEngine(runner, drafters[n], stage_times=True),
                          "generate"))
    for name, eng, fn in cases:
        eng.graphs.enabled = not args.eager_stages
        run(eng, fn, prompts[:args.batch], args.batch, args.new)  # warm-up: capture graphs
        best = None
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = run(eng, fn, prompts, args.batch, args.new)
            wall = time.perf_counter() - t0
            if best is None or wall < best[0]:
                best = (wall, res)
        wall, (out, rounds, decode_s, stages, tokens) = best
        if args.kernels and not name.endswith("/stages"):
            rows.setdefault("kernels", {})[name] = round_kernels(eng, fn, prompts[:args.batch],
                                                                 args.new)
        rows[name] = dict(tokens=out, rounds=rounds, step_ms=1e3 * decode_s / rounds,
                          tokens_per_s=tokens / wall, wall_s=wall,
                          stages_ms={k: 1e3 * v / rounds for k, v in stages.items()
                                     if k != "hist"}, hist=stages.get("hist"))
    kernels = rows.pop("kernels", {})
    ar = rows["autoregressive"]
    report = {"device": torch.cuda.get_device_name(), "dtype": args.dtype, "batch": args.batch,
              "stage_graphs": not args.eager_stages,
              "prompts": args.prompts, "new_tokens": args.new, "dataset": args.dataset,
              "decode_step_ms": round(ar["step_ms"], 4), "drafters": {}}
    print(f"{report['device']}  {args.dtype}  batch {args.batch}  {args.prompts} prompts x "
          f"{args.new} tokens; decode step {ar['step_ms']:.3f} ms "
          f"({ar['tokens_per_s']:.0f} tok/s)")
    for name, r in rows.items():
        if name == "autoregressive":
            continue
        hist = r["hist"]
        tau = sum((k + 1) * n for k, n in enumerate(hist)) / max(1, sum(hist))
        d = dict(tau=round(tau, 3), round_ms=round(r["step_ms"], 4),
                 round_over_decode=round(r["step_ms"] / ar["step_ms"], 3),
                 stages_ms={k: round(v, 4) for k, v in r["stages_ms"].items()},
                 tokens_per_s=round(r["tokens_per_s"], 1),
                 speedup=round(r["tokens_per_s"] / ar["tokens_per_s"], 3),
                 greedy_identical=r["tokens"] == ar["tokens"])
        report["drafters"][name] = d
        print(f"{name:8s} tau {tau:.2f}  round {r['step_ms']:.3f} ms = "
              f"{d['round_over_decode']:.2f}x decode  speedup {d['speedup']:.2f}x  identical "
              f"{d['greedy_identical']}  stages ms {d['stages_ms']}")
    for name, k in kernels.items():
        report.setdefault("round_kernels", {})[name] = k
        print(f"{name}: a replay runs {k['kernels']} kernels over {k['span_us']:.1f} us "
              f"(their durations sum to {k['busy_us']:.1f}; {k['replays']} replays of this "
              "shape); top: " + "; ".join(f"{n[:60]} x{c} {us:.1f}" for n, c, us in k["top"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
