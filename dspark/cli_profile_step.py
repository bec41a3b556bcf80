"""`dspark profile`: where a speculative step's time goes, per stage (dspark/profiling.py)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .cli_common import cli_error


def add_profile_step_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "profile", help="profile speculative steps: host / GPU time and top kernels per stage",
        description="One warm-up generate(), then one generate() under torch.profiler with the "
        "engine's stages as named ranges (draft / schedule / target forward / accept / commit; "
        "NVTX ranges too, for Nsight). Prints per stage the host ms per call, the GPU kernel ms "
        "it launched and its top kernels, then the GPU's busy / idle time per round and the gaps "
        "between kernels; --out writes trace.json.gz (Perfetto, chrome://tracing) and "
        "summary.json.")
    p.add_argument("--target", required=True, help="target checkpoint dir (HF format)")
    p.add_argument("--drafter", default=None, metavar="DIR", help="any drafter dir (as "
                   "`dspark generate`); without it and --ngram: plain decoding")
    p.add_argument("--ngram", type=int, default=None, metavar="N", help="n-gram prompt lookup")
    p.add_argument("--dataset", required=True, metavar="FILE", help="DeepSpec-format jsonl "
                   "prompt set ({'turns': [...]}): the first --prompts prompts, one batch")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=256, help="keep a prompt's last N tokens")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--gamma", type=int, default=None)
    p.add_argument("--schedule", default="fixed", metavar="MODE", help="fixed | sync | async | "
                   "threshold:X (as `dspark generate`)")
    p.add_argument("--whole-step", action="store_true", help="the step as one CUDA graph (the "
                   "engine's default on GPU: kernels all belong to 'step'); default: one graph "
                   "per stage, which names each kernel's stage at the price of slower rounds")
    p.add_argument("--compile", action="store_true", help="torch.compile drafter and target")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--out", default=None, help="dir for trace.json.gz and summary.json")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run_profile_step_cli)
    return p


def run_profile_step_cli(args) -> int:
    import tempfile

    import torch

    from .benchmark import load_prompts
    from .cli_common import resolve_device
    from .engine import SpeculativeEngine
    from .profiling import format_summary, profile_generate

    try:
        device = resolve_device(args.device)
        if args.prompts < 1 or args.max_new_tokens < 1:
            raise ValueError("need --prompts and --max-new-tokens >= 1")
        engine = SpeculativeEngine.from_pretrained(
            args.target, drafter=args.drafter, ngram=args.ngram, gamma=args.gamma, device=device,
            dtype=args.dtype, nvtx=True, stage_times=not args.whole_step,
            compile=args.compile, schedule=args.schedule)
        if engine.tokenizer is None:
            raise ValueError(f"{args.target!r} has no tokenizer.json")
        prompts = load_prompts(args.dataset, engine.tokenizer, args.prompts, args.prompt_tokens)
        with tempfile.TemporaryDirectory() as tmp:
            out = args.out or tmp
            os.makedirs(out, exist_ok=True)
            summary = profile_generate(engine, prompts, os.path.join(out, "trace.json.gz"),
                                       max_new_tokens=args.max_new_tokens,
                                       temperature=args.temperature)
            summary["config"] = {k: v for k, v in vars(args).items() if k != "func"}
            summary["device"] = (torch.cuda.get_device_name() if device.startswith("cuda")
                                 else "cpu")
            if args.out:
                with open(os.path.join(out, "summary.json"), "w") as f:
                    json.dump(summary, f, indent=1)
    except (ValueError, FileNotFoundError) as exc:
        return cli_error("profile", exc)
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    if args.out:
        print(f"wrote {os.path.join(args.out, 'trace.json.gz')} and summary.json",
              file=sys.stderr)
    return 0
