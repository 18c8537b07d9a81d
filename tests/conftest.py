import os
from pathlib import Path

import numpy as np
import pytest

from gpu_refine.backend import available_backends, get_backend

SHARED = Path(os.environ.get("GPU_REFINE_SHARED_DATA")
              or Path(__file__).resolve().parents[1].parent / "shared" / "data")
BACKENDS = available_backends()


@pytest.fixture(params=["numpy", "cupy"])
def backend(request):
    """Every test that takes ``backend`` runs on NumPy and, where CuPy sees a GPU, on CuPy."""
    if request.param not in BACKENDS:
        pytest.skip("CuPy with a CUDA device is not available")
    return get_backend(request.param)


@pytest.fixture(scope="session")
def gpu():
    if "cupy" not in BACKENDS:
        pytest.skip("CuPy with a CUDA device is not available")
    return get_backend("cupy")


@pytest.fixture(scope="session")
def shared():
    """Path of ../shared/data; skips where it is absent."""
    if not SHARED.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED


@pytest.fixture(scope="session")
def rng():
    return np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
