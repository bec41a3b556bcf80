import os
import sys
import warnings
import zlib

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # "built without CUDA kernels" on CPU builds
    import dspark


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    if request.param == "cuda" and not dspark.cuda_available():
        pytest.skip("needs a CUDA build of dspark and a visible GPU")
    return request.param


@pytest.fixture
def seed(request) -> int:
    """A per-test seed derived from the test id: stable across runs, different across tests."""
    s = zlib.crc32(request.node.nodeid.replace("cuda", "cpu").encode())  # same inputs per device
    torch.manual_seed(s)
    return s


@pytest.fixture
def gen(seed) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of many tiny ops (small models, hundreds of calls): more
    threads only contend, and on a busy 2-core machine OpenMP's waiting threads made such tests
    20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
