"""round_t on the CPU (include/dspark/numeric.h: one definition for CPU and CUDA, host rounding by
bit manipulation) against torch's own CPU bf16/fp16 conversions, bit for bit, NaN bits included.

tests/cpp/round_t_check.cpp is built with the extension's C++ flags and compares
round_t<c10::BFloat16 / c10::Half>(v) with float(c10::X(v)) (what the CPU kernels computed before
round_t was shared): every STRIDE-th fp32 bit pattern plus the patterns around each rounding
boundary (ties, subnormal fp16, overflow to inf, NaN), and all 2^16 bits -> float conversions.
The default run takes ~2M patterns; the slow one all 2^32 (about 20 s)."""
import os
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checker(tmp_path_factory):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        pytest.skip("no C++ compiler")
    exe = str(tmp_path_factory.mktemp("numeric") / "round_t_check")
    torch_include = os.path.join(os.path.dirname(torch.__file__), "include")
    cmd = [cxx, "-std=c++20", "-O3", "-ffp-contract=off",  # CMakeLists.txt's flags for the CPU
           "-I", os.path.join(ROOT, "include"), "-I", os.path.join(ROOT, "csrc"),
           "-I", torch_include, os.path.join(ROOT, "tests", "cpp", "round_t_check.cpp"), "-o", exe]
    built = subprocess.run(cmd, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    return exe


def run(exe, stride):
    out = subprocess.run([exe, str(stride)], capture_output=True, text=True)
    assert out.returncode == 0 and "mismatches 0" in out.stdout, out.stdout + out.stderr


def test_round_t_matches_torch(checker):
    run(checker, 4099)


@pytest.mark.slow
def test_round_t_matches_torch_every_float(checker):
    run(checker, 1)
