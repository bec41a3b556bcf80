"""Helpers every `dspark` subcommand shares."""
from __future__ import annotations

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
