"""dspark's PEP 517 build backend: scikit-build-core, building against the torch that will run
the extension.

dspark compiles against torch's C++ headers and libraries, and a build loads only in the torch
(major.minor, CUDA major) it was compiled for, so it must build with the torch installed where
it will run. That torch is deliberately not in build-system.requires: pip would download the
newest torch into its isolated build environment (GBs) and build against that one. Instead:

- ``pip install --no-build-isolation .``: the build interpreter imports torch as it is;
- ``pip install .``: pip runs this backend with the target environment's interpreter but hides
  its site-packages; the backend finds torch there and tells CMake (``DSPARK_TORCH_SITE``,
  read by cmake/torch.cmake), so the isolated build still compiles against the installed torch;
- no torch in either place, or no scikit-build-core without isolation: one line saying what to
  run (pip prints it under "subprocess-exited-with-error").
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sysconfig

try:
    from scikit_build_core import build as _backend
except ImportError:  # only without build isolation: pip installs it otherwise
    _backend = None

NEEDS = "'scikit-build-core>=0.10' 'cmake>=3.26' ninja"


def _fail(message: str):
    raise SystemExit(f"dspark build: {message}")


def _prepare() -> None:
    """Check the build tools and locate torch (sets DSPARK_TORCH_SITE when it is hidden)."""
    if _backend is None:
        _fail(f"scikit-build-core is not installed in this environment (a build without "
              f"isolation uses what is installed): run `pip install {NEEDS}` first, or drop "
              "--no-build-isolation")
    if os.environ.get("DSPARK_TORCH_SITE") or importlib.util.find_spec("torch") is not None:
        return
    sites = dict.fromkeys(sysconfig.get_path(k) for k in ("purelib", "platlib"))
    for site in sites:
        if site and importlib.machinery.PathFinder.find_spec("torch", [site]) is not None:
            os.environ["DSPARK_TORCH_SITE"] = site  # the isolated build compiles against it
            return
    _fail("no torch to build against: dspark compiles against the torch installed where it "
          "will run; install torch first (e.g. `pip install torch`), then `pip install .` again")


def get_requires_for_build_wheel(config_settings=None):
    _prepare()
    return _backend.get_requires_for_build_wheel(config_settings)


def get_requires_for_build_editable(config_settings=None):
    _prepare()
    return _backend.get_requires_for_build_editable(config_settings)


def get_requires_for_build_sdist(config_settings=None):
    if _backend is None:
        _prepare()
    return _backend.get_requires_for_build_sdist(config_settings)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    _prepare()
    return _backend.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    _prepare()
    return _backend.prepare_metadata_for_build_editable(metadata_directory, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _prepare()
    return _backend.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _prepare()
    return _backend.build_editable(wheel_directory, config_settings, metadata_directory)


def build_sdist(sdist_directory, config_settings=None):
    if _backend is None:
        _prepare()
    return _backend.build_sdist(sdist_directory, config_settings)
