"""Helpers every `dspark` subcommand shares."""
from __future__ import annotations

from typing import Optional


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
