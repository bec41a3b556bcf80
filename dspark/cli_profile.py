"""`dspark profile-sps`: measure the target's verify steps per second SPS(B) on this machine for
the prefix scheduler, cache the table (dspark/scheduler.py) and plot it."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .cli_common import add_fused_max_rows, cli_error


def add_profile_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "profile-sps", help="measure the target's verify steps/s SPS(B) for the scheduler",
        description="Times the target's verify forward (runner.forward_tree; replayed from a "
        "CUDA graph on GPU) over B = 1..--max-tokens tokens in chains of up to gamma + 1 tokens "
        "at a fixed context, on a grid of B with interpolation in between; writes the table as "
        "JSON, named after model architecture + device + dtype + kernel variant (what "
        "dspark.scheduler.load_sps finds), and a PNG plot beside it.")
    p.add_argument("--target", required=True, help="target checkpoint dir (HF format)")
    p.add_argument("--max-tokens", type=int, default=None, help="largest B (default: "
                   "128 * (gamma + 1) on CUDA, 4 * (gamma + 1) on CPU)")
    p.add_argument("--gamma", type=int, default=7, help="drafts per request: a verify's "
                   "requests hold up to gamma + 1 tokens")
    p.add_argument("--context", type=int, default=512, help="tokens already in each request's "
                   "KV cache")
    p.add_argument("--requests", type=int, default=None, help="spread B over at least this "
                   "many requests (default: as few as hold B)")
    p.add_argument("--grid", default=None, help="comma-separated B to measure (default: every "
                   "B up to 64 on CUDA, then every 8, then every 32; coarser on CPU)")
    p.add_argument("--reps", type=int, default=None, help="timed forwards per B (default 20 "
                   "on CUDA, 3 on CPU)")
    p.add_argument("--interpolate", choices=("linear", "step"), default="linear")
    p.add_argument("--no-monotone", dest="monotone", action="store_false",
                   help="keep the raw times (default: time(B) = least time of any size >= B)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                   help="the runner's fused decode/verify kernels (default: on CUDA)")
    add_fused_max_rows(p)
    p.add_argument("--batch-invariant", action="store_true",
                   help="every verify on the dspark kernels (as `dspark generate` with it)")
    p.add_argument("--out", default=None, help="dir for the table and the plot (default: the "
                   "cache, $DSPARK_SPS_CACHE or ~/.cache/dspark/sps)")
    p.add_argument("--force", action="store_true", help="measure even if a table is cached")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    p.set_defaults(func=run_profile_cli)
    return p


def run_profile_cli(args) -> int:
    import torch

    from .models import ModelRunner, load_model
    from .scheduler import load_sps, plot_sps, profile_sps, sps_cache_path, sps_key

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    max_tokens = args.max_tokens or (128 if cuda else 4) * (args.gamma + 1)
    try:
        if args.gamma < 1 or max_tokens < 1:
            raise ValueError("need --gamma and --max-tokens >= 1")
        grid = [int(b) for b in args.grid.split(",")] if args.grid else None
        model = load_model(args.target, device, args.dtype)
        runner = ModelRunner(model, fused=args.fused, batch_invariant=args.batch_invariant,
                             fused_max_rows=args.fused_max_rows)
        table = None if args.force else load_sps(runner, max_tokens, cache_dir=args.out)
        if table is not None:
            print(f"cached: {sps_cache_path(sps_key(runner), args.out)} (--force to measure "
                  "again)", file=sys.stderr)
        else:
            progress = sys.stderr.isatty() if args.progress is None else args.progress
            table = profile_sps(runner, max_tokens, gamma=args.gamma, context=args.context,
                                requests=args.requests, grid=grid, reps=args.reps,
                                interpolate=args.interpolate, monotone=args.monotone,
                                cache_dir=args.out, progress=progress)
    except (ValueError, FileNotFoundError) as exc:
        return cli_error("profile-sps", exc)
    path = sps_cache_path(table.key, args.out)
    png = plot_sps(table, os.path.splitext(path)[0] + ".png")
    print(f"wrote {path}\nwrote {png}", file=sys.stderr)
    if args.json:
        print(json.dumps(table.to_dict(), indent=1))
        return 0
    print(f"{table.key['model']} {table.key['dtype']} {table.key['variant']} on "
          f"{table.key['device']}: SPS(B), steps/s")
    shown = sorted({b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
                    if b <= table.max_tokens} | {table.max_tokens})
    for b in shown:
        s = table.sps[b - 1]
        print(f"  B = {b:5d}: {s:10.1f} steps/s  {1e3 / s:8.3f} ms  {b * s:12.0f} tokens/s")
    return 0
