"""dspark: DSpark speculative decoding for PyTorch.

Importing dspark registers the native ops as ``torch.ops.dspark.*`` (verify, sample, ...).
"""
import importlib
import os

from . import _install

try:
    _build_info = importlib.import_module(__name__ + "._build_info")
except ModuleNotFoundError as exc:  # no compiled parts: usually the source tree on sys.path
    if exc.name != __name__ + "._build_info":
        raise
    _install.fail(_install.not_built_message(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402  (after the check above: an unbuilt copy needs no torch to say so)

_mismatch = _install.torch_mismatch(_build_info.TORCH_VERSION, _build_info.TORCH_CUDA,
                                    torch.__version__, torch.version.cuda, _build_info.WITH_CUDA,
                                    getattr(_build_info, "SOURCE_DIR", None))
if _mismatch:
    _install.fail(_mismatch)

try:
    from . import _C  # noqa: F401  (runs the TORCH_LIBRARY registrations)
except ImportError as exc:  # pragma: no cover - depends on the install
    _install.fail(f"dspark's native module dspark._C does not load in torch {torch.__version__} "
                  f"({exc}): rebuild it with "
                  f"`{_install.reinstall_command(getattr(_build_info, 'SOURCE_DIR', None))}`")

# _fake registers the fake kernels (torch.compile / meta tensors); ops holds the typed wrappers
from . import _fake, ops  # noqa: F401,E402
from ._build_info import CUDA_ARCHS, TORCH_VERSION, WITH_CUDA  # noqa: E402

__version__ = "0.1.0"


def cuda_available() -> bool:
    """True when this build has the CUDA kernels *and* a GPU is visible."""
    return bool(_C.cuda_enabled()) and torch.cuda.is_available()


def build_info() -> dict:
    """What this copy of dspark was compiled with, and what it can run here (README: Install).

    cuda_kernels / cuda_archs / cuda_runtime: whether the CUDA kernels were compiled, for which
    architectures (CMake syntax: 90 = sm_90 binary + compute_90 PTX, 80-real = binary only,
    80-virtual = PTX only) and with which CUDA toolkit; built_against_torch / running_torch (the
    import refuses a major.minor or CUDA-major mismatch); gpu_visible; devices: per visible GPU
    its name, capability and the architecture the kernels run as there (kernel_ptx_arch,
    kernel_binary_arch; sm90_paths: thread-block clusters and programmatic launch in use)."""
    facts = _C.build_facts()
    devices = []
    if facts["with_cuda"] and torch.cuda.is_available():
        devices = [_C.device_properties(i) for i in range(torch.cuda.device_count())]
    return {
        "version": __version__,
        "cuda_kernels": bool(facts["with_cuda"]),
        "cuda_archs": CUDA_ARCHS if WITH_CUDA else None,
        "cuda_runtime": facts["cuda_runtime"],
        "built_against_torch": TORCH_VERSION,
        "running_torch": torch.__version__,
        "gpu_visible": torch.cuda.is_available(),
        "devices": devices,
    }


if not _C.cuda_enabled():
    import warnings

    warnings.warn(
        "dspark was built without CUDA kernels (no nvcc or a CPU-only torch at build time); "
        "the ops run on CPU only. dspark.build_info() has the details.",
        stacklevel=2,
    )
