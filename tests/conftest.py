import os
from pathlib import Path

import numpy as np
import pytest

import host_cuda
from gpu_refine.backend import Backend, available_backends, get_backend

SHARED = Path(os.environ.get("GPU_REFINE_SHARED_DATA")
              or Path(__file__).resolve().parents[1].parent / "shared" / "data")
BACKENDS = available_backends()


@pytest.fixture(params=["numpy", "cupy"])
def backend(request):
    """Every test that takes ``backend`` runs on NumPy and, where CuPy sees a GPU, on CuPy."""
    if request.param not in BACKENDS:
        pytest.skip("CuPy with a CUDA device is not available")
    return get_backend(request.param)


@pytest.fixture(scope="session", params=["cupy", "host"])
def gpu(request):
    """The CUDA kernel provider: on the GPU where CuPy sees one, and with the same kernel
    sources and launch code compiled for the host CPU (tests/host_cuda.py) where a C++20
    compiler is present, so that parity tests run the .cu files on every machine."""
    if request.param == "cupy":
        if "cupy" not in BACKENDS:
            pytest.skip("CuPy with a CUDA device is not available")
        return get_backend("cupy")
    if host_cuda.compiler() is None:
        pytest.skip("no C++ compiler to build the CUDA sources for the host")
    return Backend("host", np, host_cuda.host_kernels(), "CUDA sources on the host CPU")


@pytest.fixture(scope="session")
def shared():
    """Path of ../shared/data; skips where it is absent."""
    if not SHARED.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED


@pytest.fixture(scope="session")
def rng():
    return np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
