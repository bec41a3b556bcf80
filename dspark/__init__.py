"""dspark: DSpark speculative decoding for PyTorch.

Importing dspark registers the native ops as ``torch.ops.dspark.*`` (verify, sample, ...).
"""
import torch

try:
    from . import _C  # noqa: F401  (runs the TORCH_LIBRARY registrations)
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "dspark's native module dspark._C is missing or does not match this torch "
        f"({torch.__version__}). Reinstall with `pip install --no-build-isolation .` so it is "
        f"compiled against the installed torch. Original error: {exc}"
    ) from exc

# _fake registers the fake kernels (torch.compile / meta tensors); ops holds the typed wrappers
from . import _fake, ops  # noqa: F401,E402
from ._build_info import CUDA_ARCHS, TORCH_VERSION, WITH_CUDA  # noqa: E402

__version__ = "0.1.0"


def cuda_available() -> bool:
    """True when this build has the CUDA kernels *and* a GPU is visible."""
    return bool(_C.cuda_enabled()) and torch.cuda.is_available()


def build_info() -> dict:
    """What this copy of dspark was compiled with, and what it can run here."""
    return {
        "version": __version__,
        "cuda_kernels": bool(_C.cuda_enabled()),
        "cuda_archs": CUDA_ARCHS if WITH_CUDA else None,
        "built_against_torch": TORCH_VERSION,
        "running_torch": torch.__version__,
        "gpu_visible": torch.cuda.is_available(),
    }


if not _C.cuda_enabled():
    import warnings

    warnings.warn(
        "dspark was built without CUDA kernels (no nvcc or a CPU-only torch at build time); "
        "the ops run on CPU only. dspark.build_info() has the details.",
        stacklevel=2,
    )
