"""Import-time checks of the install, in pure Python so they run before the native module loads
(a module built against another torch can fail to load with an undefined symbol, or crash).

- :func:`not_built_message`: ``import dspark`` found a copy with no compiled parts, typically the
  source tree shadowing the installed package when Python runs from the repository root.
- :func:`torch_mismatch`: the build's torch (major.minor, and the CUDA major when it has CUDA
  kernels) must be the running torch's.
"""
from __future__ import annotations

import importlib.machinery
import os
import re
import sys
from typing import Optional


def _major_minor(version: str) -> tuple:
    m = re.match(r"\s*(\d+)\.(\d+)", version or "")
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def _with_cuda(version: str, cuda: Optional[str]) -> str:
    return f"{version} (CUDA {cuda})" if cuda else f"{version} (CPU-only)"


def reinstall_command(source_dir: Optional[str] = None) -> str:
    """The command that rebuilds dspark against the torch of this interpreter."""
    src = source_dir if source_dir and os.path.isfile(os.path.join(source_dir, "CMakeLists.txt")) \
        else "<dspark source dir>"
    return (f"{os.path.basename(sys.executable) or 'python'} -m pip install --no-build-isolation "
            f"--no-deps --force-reinstall {src}")


def torch_mismatch(built: str, built_cuda: Optional[str], running: str,
                   running_cuda: Optional[str], with_cuda: bool = True,
                   source_dir: Optional[str] = None) -> Optional[str]:
    """None when a build against torch ``built`` (CUDA ``built_cuda``; None or "" for a CPU-only
    torch) loads in torch ``running`` (``running_cuda``); else a one-line reason with the
    reinstall command. The C++ ABI of torch changes between minor releases, and CUDA kernels
    need the runtime major they were compiled for; a CPU-only build only needs the former."""
    same_torch = _major_minor(built) == _major_minor(running) and None not in _major_minor(built)
    same_cuda = not with_cuda or (
        bool(running_cuda) and _major_minor(built_cuda or "")[0] == _major_minor(running_cuda)[0])
    if same_torch and same_cuda:
        return None
    return (f"dspark was built against torch {_with_cuda(built, built_cuda)} but torch "
            f"{_with_cuda(running, running_cuda)} is running: rebuild it against this torch with "
            f"`{reinstall_command(source_dir)}`")


def _installed_elsewhere(package_dir: str) -> Optional[str]:
    """Another dspark on sys.path (the one a source tree shadows), if any."""
    parent = os.path.realpath(os.path.dirname(package_dir))
    others = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != parent]
    spec = importlib.machinery.PathFinder.find_spec("dspark", others)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def not_built_message(package_dir: str) -> str:
    """Why a dspark without its compiled parts was imported, and what to do."""
    root = os.path.dirname(package_dir)
    if not os.path.isfile(os.path.join(root, "CMakeLists.txt")):
        return (f"dspark's native module is missing from {package_dir}: reinstall it with "
                f"`{reinstall_command()}`")
    other = _installed_elsewhere(package_dir)
    if other:
        return (f"`import dspark` found the source tree {package_dir} (not built), which shadows "
                f"the dspark installed at {other}: run Python from another directory (e.g. "
                "tests/ or /tmp), or install the source tree in editable mode "
                "(`pip install --no-build-isolation -e .`)")
    return (f"{package_dir} is dspark's source tree and is not built: install it (`pip install "
            "--no-build-isolation .`, or `-e .` for development) and import it from another "
            "directory")


def fail(message: str) -> None:
    """Refuse the import: ImportError for Python code; for the `dspark` command one line on
    stderr and exit code 2 (no traceback for a user who only ran the CLI)."""
    if os.path.basename(sys.argv[0] if sys.argv else "") == "dspark":
        print(f"dspark: error: {message}", file=sys.stderr)
        raise SystemExit(2)
    raise ImportError(message)
