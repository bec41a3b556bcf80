"""`dspark generate`: speculative (or autoregressive) generation from HF checkpoint dirs."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .cli_common import add_draft_temperature_scale, add_fused_max_rows, add_step_overhead


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="generate text with speculative decoding",
                              description="Generate with a target model and a drafter (a "
                              "trained DSpark / DFlash / EAGLE-3 drafter, a draft LM, or n-gram "
                              "prompt lookup); prints text and metrics.")
    p.add_argument("--target", required=True, help="target checkpoint dir (config.json, "
                   "*.safetensors, tokenizer.json)")
    d = p.add_mutually_exclusive_group()
    d.add_argument("--drafter", metavar="DIR", help="drafter dir: trained by `dspark "
                   "train-draft` (drafter_config.json) or an HF causal LM with the target's "
                   "tokenizer (config.json) used as draft model")
    d.add_argument("--draft", dest="drafter", help=argparse.SUPPRESS)  # the old name
    d.add_argument("--ngram", type=int, metavar="N", help="prompt-lookup drafter, n-grams up to N")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text (repeat for several); '@FILE' reads a prompt file: *.jsonl "
                   "one prompt per record (its first turn), any other file one per line")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=1, help="requests per batch (prompts are cycled "
                   "to fill the batch); with --continuous, requests in flight")
    p.add_argument("--continuous", action="store_true", help="continuous batching: every "
                   "prompt once, a finished request's slot refilled with the next "
                   "(SpeculativeEngine.serve)")
    p.add_argument("--gamma", type=int, default=None, help="draft depth (default: a trained "
                   "drafter's block size, else 4)")
    p.add_argument("--tree-topk", type=int, default=1, help="draft-model tree: k children per "
                   "depth (1 = chain)")
    p.add_argument("--seed", type=int, default=0, help="request i uses seed + i")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="torch.compile the target's decode/verify forwards and the drafter's "
                   "step (fewer, fused kernels; tens of seconds per shape to compile); MODE: "
                   "default or max-autotune-no-cudagraphs")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                   help="run decode / verify calls of up to 64 token rows on dspark::fused_linear "
                   "+ decode_attention (default: on CUDA)")
    add_fused_max_rows(p)
    p.add_argument("--batch-invariant", action="store_true",
                   help="run every decode / verify call on the dspark kernels, whatever the rows: "
                   "greedy speculative == greedy autoregressive at any batch size (slower than "
                   "cuBLAS above 64 rows)")
    p.add_argument("--schedule", default="fixed", metavar="MODE",
                   help="verify budgets: fixed (every draft, default) | sync | async | "
                   "threshold:X (DSpark drafters: verify each request's prefix by calibrated "
                   "confidence and the target's steps-per-second table)")
    add_step_overhead(p)
    add_draft_temperature_scale(p)
    p.add_argument("--ar-fallback", action="store_true",
                   help="time speculative against plain decoding steps at the start and "
                   "continue with plain decoding if it is faster (dspark/fallback.py)")
    p.add_argument("--sps", default=None, metavar="JSON", help="steps-per-second table for "
                   "--schedule sync/async (default: the target's cached table from `dspark "
                   "profile-sps`, measured now if there is none)")
    p.add_argument("--autoregressive", action="store_true", help="baseline: no drafting")
    p.add_argument("--compare", action="store_true", help="also run the autoregressive baseline "
                   "and report the speedup and whether greedy outputs match")
    p.add_argument("--tp-drafter", choices=("replicated", "broadcast"), default="replicated",
                   help="under torchrun (tensor-parallel target): every rank runs the drafter, "
                   "or rank 0 runs it and broadcasts its proposal")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="token progress bar on stderr (default: when stderr is a terminal)")
    p.set_defaults(func=run_generate)
    return p


def _prompts(items: list) -> list:
    from .train.data import read_prompt_texts
    out = []
    for item in items:
        if item.startswith("@"):
            if not os.path.isfile(item[1:]):
                raise ValueError(f"--prompt {item}: no such file {item[1:]!r}")
            out.extend(read_prompt_texts([item[1:]]))
        else:
            out.append(item)
    return out


def run_generate(args) -> int:
    from .cli_common import launch

    # under torchrun: one process per rank, the target tensor-parallel over all of them
    return launch("dspark generate", args.device, lambda tp, dev: _generate(args, tp, dev))


def _generate(args, tp, device: str) -> int:
    from .engine import SpeculativeEngine

    main = tp is None or tp.is_main  # only rank 0 prints
    engine = SpeculativeEngine.from_pretrained(
        args.target, drafter=args.drafter, ngram=args.ngram, gamma=args.gamma,
        tree_topk=args.tree_topk, device=device, dtype=args.dtype, tp=tp,
        drafter_mode=args.tp_drafter, compile=args.compile or False, fused=args.fused,
        batch_invariant=args.batch_invariant, fused_max_rows=args.fused_max_rows,
        schedule=args.schedule, sps=args.sps, step_overhead=args.step_overhead / 1e3,
        ar_fallback=args.ar_fallback, draft_temperature_scale=args.draft_temperature_scale)
    if engine.tokenizer is None:
        raise ValueError(f"{args.target!r} has no tokenizer.json")
    prompts = _prompts(args.prompt)
    if args.batch < 1 or not prompts:
        raise ValueError("need --batch >= 1 and at least one prompt")
    if args.continuous and tp is not None:
        raise ValueError("--continuous is not supported with tensor parallelism yet")
    if not args.continuous:  # static batches: the prompts cycled to fill the last one
        n = max(len(prompts), args.batch)
        prompts = [prompts[i % len(prompts)] for i in range(-(-n // args.batch) * args.batch)]
    spec = engine.drafter is not None and not args.autoregressive
    runs = [("speculative" if spec else "autoregressive", spec)]
    if args.compare and spec:
        runs.append(("autoregressive", False))
    report = {}
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p)
    progress = main and (sys.stderr.isatty() if args.progress is None else args.progress)
    for name, use_spec in runs:
        if args.continuous:  # every prompt, --batch of them in flight (SpeculativeEngine.serve)
            gen = engine.serve(prompts, args.batch, speculative=use_spec, **sampling,
                               seed=[args.seed + j for j in range(len(prompts))])
            texts, metrics = gen.text, [gen.metrics]
        else:
            texts, metrics = [], []
            for i in range(0, len(prompts), args.batch):
                chunk = prompts[i:i + args.batch]
                gen = (engine.generate if use_spec else engine.generate_autoregressive)(
                    chunk, **sampling, seed=[args.seed + i + j for j in range(len(chunk))],
                    progress=progress)
                texts += gen.text
                metrics.append(gen.metrics)
        report[name] = {"text": texts, "metrics": [m.to_dict() for m in metrics],
                        "summary": [m.summary() for m in metrics]}
    if not main:
        return 0
    if len(report) == 2:
        tps = [sum(m["new_tokens"] for m in r["metrics"]) / sum(m["total_s"] for m in r["metrics"])
               for r in report.values()]
        report["speedup"] = tps[0] / tps[1] if tps[1] else None
        report["identical_text"] = report["speculative"]["text"] == report["autoregressive"]["text"]
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    for name, r in ((k, v) for k, v in report.items() if isinstance(v, dict)):
        print(f"=== {name} ===")
        for i, t in enumerate(r["text"]):
            print(f"[{i}] {t}")
        for s in r["summary"]:
            print(f"metrics: {s}")
    if "speedup" in report:
        print(f"speedup {report['speedup']:.2f}x; identical text: {report['identical_text']}")
    return 0
