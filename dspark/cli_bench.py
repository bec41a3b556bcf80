"""`dspark bench`: speculative decoding vs the autoregressive baseline on prompt sets."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .cli_common import add_draft_temperature_scale, add_fused_max_rows, add_step_overhead


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="measure speculative decoding against plain decoding on prompt sets",
        description="In one process and on one runner: the autoregressive baseline and each "
        "drafter on the same prompts, per dataset, temperature and batch size. Prints a table "
        "per dataset (tau, per-position acceptance, tokens/s, speedup, per-user decode speedup "
        "(u-spd: prefill excluded), greedy-identical fraction, time per round: draft / "
        "target forward / accept / commit / other); --out writes results.json and PNG plots.")
    p.add_argument("--target", required=True, help="target checkpoint dir (HF format)")
    p.add_argument("--drafter", nargs="+", default=[], metavar="DIR", help="drafter dirs "
                   "(trained by `dspark train-draft`, or an HF causal LM used as draft model)")
    p.add_argument("--ngram", type=int, metavar="N", help="also bench n-gram prompt lookup")
    p.add_argument("--dataset", nargs="+", required=True, metavar="FILE",
                   help="DeepSpec-format jsonl prompt sets ({'turns': [...]}); one domain each")
    p.add_argument("--prompts", type=int, default=16, help="prompts per dataset")
    p.add_argument("--prompt-tokens", type=int, default=256, help="keep a prompt's last N tokens")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, nargs="+", default=[0.0])
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--gamma", type=int, nargs="+", default=[None], help="draft depths, each "
                   "a run of every drafter (default: a trained drafter's block size, else 4)")
    p.add_argument("--schedule", nargs="+", default=["fixed"], metavar="MODE",
                   help="verify budgets, each a run of every drafter: fixed | sync | async | "
                   "threshold:X (scheduled modes need a DSpark drafter; others are skipped); "
                   "MODE+ar: plain decoding at a batch size where it measures faster "
                   "(the engine's ar_fallback)")
    p.add_argument("--sps", default=None, metavar="JSON", help="steps-per-second table for the "
                   "scheduled runs (default: the target's cached table, measured if missing)")
    add_step_overhead(p)
    add_draft_temperature_scale(p)
    p.add_argument("--serve-requests", type=int, default=0, metavar="N",
                   help="continuous batching: N requests (the prompt set cycled) per dataset and "
                   "batch, --batch slots refilled as requests finish (SpeculativeEngine.serve); "
                   "default 0: static batches of --batch prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                   help="the runner's fused decode kernels (default: on CUDA)")
    add_fused_max_rows(p)
    p.add_argument("--compile-drafter", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each drafter's per-round bodies (Drafter.compile: DSpark / "
                   "DFlash backbone pass and context write; one compile per batch size). "
                   "Default: on CUDA (benchmark pair, H100: DSpark round 1.86 -> 1.54 ms, "
                   "1.56x -> 1.78x plain decoding on humaneval), off on CPU (not measured there)")
    p.add_argument("--tp-drafter", choices=("replicated", "broadcast"), default="replicated",
                   help="under torchrun (tensor-parallel target): every rank runs the drafters, "
                   "or rank 0 runs them and broadcasts their proposals")
    p.add_argument("--nvtx", action="store_true", help="NVTX ranges around every step stage")
    p.add_argument("--stage-times", action=argparse.BooleanOptionalAction, default=None,
                   help="time draft / target forward / accept / commit apart (GPU: one CUDA "
                   "graph per stage, slower rounds; default: on CPU only)")
    p.add_argument("--out", default=None, help="dir for results.json and the PNG plots")
    p.add_argument("--json", action="store_true", help="print the JSON report, not tables")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    p.set_defaults(func=run_bench_cli)
    return p


def run_bench_cli(args) -> int:
    from .cli_common import launch

    # under torchrun: one process per rank, the target tensor-parallel over all of them
    return launch("dspark bench", args.device, lambda tp, dev: _bench(args, tp, dev),
                  errors=(ValueError, FileNotFoundError))


def _bench(args, tp, device: str) -> int:
    import torch

    from .benchmark import format_table, load_prompts, run_bench, save_report
    from .drafters import NgramDrafter, load_drafter
    from .models import ModelRunner, load_model, load_tokenizer

    main = tp is None or tp.is_main  # only rank 0 prints and writes
    if args.compile_drafter is None:  # on where it was measured faster: the GPU
        args.compile_drafter = torch.device(device).type == "cuda"
    if min(args.batch) < 1 or args.prompts < 1 or args.max_new_tokens < 1:
        raise ValueError("need --batch, --prompts and --max-new-tokens >= 1")
    if args.serve_requests < 0:
        raise ValueError(f"--serve-requests must be >= 0, got {args.serve_requests}")
    if tp is None:
        model = load_model(args.target, device, args.dtype)
    else:
        from .drafters.tp import load_drafter_tp, place_drafter
        from .models.tp_loader import load_model_tp
        model = load_model_tp(args.target, tp, device, args.dtype)
    tok = load_tokenizer(args.target)
    if tok is None:
        raise ValueError(f"{args.target!r} has no tokenizer.json")
    drafters = {}
    for gamma in args.gamma:  # one drafter per depth (the engine sets a drafter's gamma)
        tag = f" g{gamma}" if len(args.gamma) > 1 else ""
        for path in args.drafter:
            d = (load_drafter(path, model, gamma) if tp is None else
                 load_drafter_tp(path, model, tp, gamma, mode=args.tp_drafter))
            inner = getattr(d, "inner", d)
            name = getattr(getattr(inner, "spec", None), "method", "draft-lm")
            if name + tag in drafters:
                name = f"{name}:{os.path.basename(os.path.normpath(path))}"
            if args.compile_drafter:
                d.compile()
            drafters[name + tag] = d
        if args.ngram:
            d = NgramDrafter(gamma or 4, max_ngram=args.ngram)
            drafters["ngram" + tag] = d if tp is None else place_drafter(d, tp, args.tp_drafter)
    if not drafters:
        raise ValueError("nothing to compare: give --drafter DIR and/or --ngram N")
    datasets = {os.path.splitext(os.path.basename(f))[0]:
                load_prompts(f, tok, args.prompts, args.prompt_tokens) for f in args.dataset}
    runner = ModelRunner(model, fused=args.fused, fused_max_rows=args.fused_max_rows)
    progress = main and (sys.stderr.isatty() if args.progress is None else args.progress)

    def on_run(runs):  # each finished run: a line on stderr, the runs so far under --out
        if not main:
            return
        r = runs[-1]
        print(f"bench: {r['dataset']} T={r['temperature']:g} batch {r['batch']} {r['method']}: "
              f"{r['tokens_per_s']:.1f} tok/s, {r.get('speedup', 1.0):.2f}x", file=sys.stderr,
              flush=True)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "results.partial.json"), "w") as f:
                json.dump({"runs": runs}, f, indent=1)

    report = run_bench(runner, drafters, datasets, temperatures=args.temperature,
                       batches=args.batch, max_new_tokens=args.max_new_tokens,
                       seed=args.seed, progress=progress, stage_times=args.stage_times,
                       schedules=args.schedule, sps=args.sps,
                       step_overhead=args.step_overhead / 1e3,
                       serve_requests=args.serve_requests,
                       draft_temperature_scale=args.draft_temperature_scale, on_run=on_run)
    report["config"] = {k: v for k, v in vars(args).items() if k != "func"}
    report["config"]["fused_max_rows_used"] = runner.fused_max_rows  # ("auto": as resolved)
    report["device"] = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    if tp is not None:
        report["tensor_parallel"] = {"world": tp.world, "reduce": tp.reduce_mode,
                                     "drafter": args.tp_drafter}
    if not main:
        return 0
    if args.out:
        for path in save_report(report, args.out):
            print(f"wrote {path}", file=sys.stderr)
    print(json.dumps(report, indent=1) if args.json else format_table(report))
    return 0
