"""Helpers every `dspark` subcommand shares."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional


def resolve_device(name: Optional[str]) -> str:
    """``--device``: a device this build can run on (default: cuda when dspark's CUDA kernels and
    a GPU are both there, else cpu). ValueError with one line, not torch's traceback."""
    import torch

    import dspark
    if name is None:
        return "cuda" if dspark.cuda_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r} is not a device (cpu, cuda or cuda:N)") from None
    if dev.type == "cpu":
        return name
    if dev.type != "cuda":
        raise ValueError(f"--device {name}: dspark runs on cpu or cuda")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible to torch {torch.__version__} "
                         f"(CUDA {torch.version.cuda or 'none'}); use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
    if not dspark.cuda_available():
        raise ValueError(f"--device {name}: this dspark build has no CUDA kernels "
                         "(dspark.build_info()); rebuild it with nvcc on PATH (README: Install)")
    return name


def _error_line(line: str) -> None:
    # one write per line: the ranks share torchrun's stderr, and print() writes the text and the
    # newline apart when Python runs unbuffered, so two ranks' lines could interleave
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def cli_error(command: str, exc) -> int:
    """Every subcommand's failure: one line ``dspark COMMAND: error: ...`` on stderr, exit 2."""
    _error_line(f"dspark {command}: error: {exc}")
    return 2


def launch(prog: str, device: Optional[str], body: Callable[..., int],
           errors: tuple = (ValueError,)) -> int:
    """A subcommand under ``torchrun`` or in a plain process: ``body(tp, device)`` -> exit code,
    with ``tp`` from :func:`dspark.distributed.init_from_env` (None in a plain process) and
    ``device`` this rank's (``--device`` checked by :func:`resolve_device`). ``errors`` (and
    :class:`~dspark.distributed.DistributedError`) become one line on stderr, ``prog: error
    (rank r of w): ...``, and exit code 2; the process group is torn down in every case."""
    from .distributed import DistributedError, init_from_env, local_device, shutdown, who

    try:
        device = local_device(resolve_device(device))
        tp = init_from_env(device)
    except ValueError as exc:
        _error_line(f"{prog}: error: {exc}")
        return 2
    ok = False
    try:
        rc = body(tp, device)
        ok = True
        return rc
    except errors + (DistributedError,) as exc:
        _error_line(f"{prog}: error{who(tp)}: {exc}")
        # a DistributedError is raised on every rank, so they all reach the barrier; after a
        # failure on one rank only the others may never come
        ok = isinstance(exc, DistributedError)
        return 2
    finally:
        shutdown(barrier=ok)


def fused_max_rows_arg(text: str):
    """``--fused-max-rows``: an integer (its range is the runner's check) or ``auto``."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'auto', got {text!r}")


def add_fused_max_rows(p) -> None:
    """``--fused-max-rows N|auto`` (ModelRunner's fused_max_rows) for the commands that build
    one."""
    p.add_argument("--fused-max-rows", type=fused_max_rows_arg, default=None, metavar="N|auto",
                   help="the largest decode / verify call (token rows) on the fused kernels "
                   "(default 64); above it cuBLAS + SDPA. auto: this model's measured crossover "
                   "(timed once per model, GPU and dtype, then cached beside the SPS tables). "
                   "Measured on an H100: 8 at the Qwen3-8B shape (cuBLAS wins from 16 rows), "
                   "~320 for the 24 x 256 benchmark pair")


def add_draft_temperature_scale(p) -> None:
    """``--draft-temperature-scale S`` (the engine's draft_temperature_scale)."""
    p.add_argument("--draft-temperature-scale", type=float, default=1.0, metavar="S",
                   help="drafters sample at the request's temperature times S (default 1); the "
                   "output stays exact at any S > 0 (verify reads the distribution each draft "
                   "was drawn from); S < 1 sharpens an under-confident drafter at T > 0")


def add_step_overhead(p) -> None:
    """``--step-overhead MS`` (the engine's step_overhead, in milliseconds)."""
    p.add_argument("--step-overhead", type=float, default=0.0, metavar="MS",
                   help="scheduled modes: milliseconds a step costs besides the verify forward "
                   "(draft + accept + commit, e.g. from `dspark bench`'s time split); the "
                   "scheduler ranks with 1 / (1 / SPS(B) + overhead) (default 0)")
