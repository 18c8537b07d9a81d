import os
from pathlib import Path

import numpy as np
import pytest

import host_cuda
from gpu_refine.backend import Backend, available_backends, get_backend

SHARED = Path(os.environ.get("GPU_REFINE_SHARED_DATA")
              or Path(__file__).resolve().parents[1].parent / "shared" / "data")
BACKENDS = available_backends()


@pytest.fixture(params=["numpy", "cupy", "standin"])
def backend(request):
    """Every test that takes ``backend`` runs on NumPy, where CuPy sees a GPU on CuPy, and
    where a C++20 compiler is present on the CuPy stand-in: the engine's GPU branches with
    CuPy's rules for host and device arrays and the CUDA sources compiled for the host."""
    if request.param == "standin":
        if request.node.get_closest_marker("large"):
            pytest.skip("full-size case: its GPU branches run on the stand-in at example size")
        return _standin()
    if request.param not in BACKENDS:
        pytest.skip("CuPy with a CUDA device is not available")
    return get_backend(request.param)


def _standin():
    if host_cuda.compiler() is None:
        pytest.skip("no C++ compiler to build the CUDA sources for the host")
    return Backend("cupy", host_cuda.standin_cupy(), host_cuda.host_kernels(),
                   "CuPy stand-in on the host CPU (tests/cupy_standin.py)")


@pytest.fixture
def standin():
    """The CuPy stand-in alone (for what only it can simulate: a device running out of memory)."""
    return _standin()


@pytest.fixture(scope="session", params=["cupy", "standin"])
def gpu(request):
    """The CUDA kernel provider: on the GPU where CuPy sees one, and with the same kernel
    sources and launch code compiled for the host CPU (tests/host_cuda.py) where a C++20
    compiler is present, so that parity tests run the .cu files on every machine."""
    if request.param == "cupy":
        if "cupy" not in BACKENDS:
            pytest.skip("CuPy with a CUDA device is not available")
        return get_backend("cupy")
    return _standin()


@pytest.fixture(scope="session")
def shared():
    """Path of ../shared/data; skips where it is absent."""
    if not SHARED.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED


@pytest.fixture(scope="session")
def rng():
    return np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
