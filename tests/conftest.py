import os
import zlib
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


def pytest_addoption(parser):
    parser.addoption("--seed", type=int, default=None,
                     help="seed of the rng fixture (default: $GPU_REFINE_TEST_SEED, else random)")


def _seed(config):
    """The rng fixture's seed: --seed, else GPU_REFINE_TEST_SEED, else a fresh random one."""
    if not hasattr(config, "_gpu_refine_seed"):
        given = config.getoption("--seed")
        if given is None and os.environ.get("GPU_REFINE_TEST_SEED"):
            given = int(os.environ["GPU_REFINE_TEST_SEED"])
        config._gpu_refine_seed = (given if given is not None
                                   else int.from_bytes(os.urandom(4), "little"))
    return config._gpu_refine_seed


def pytest_configure(config):
    # pytest-xdist's workers inherit the environment: one seed for the whole run.
    if not hasattr(config, "workerinput"):
        os.environ["GPU_REFINE_TEST_SEED"] = str(_seed(config))


def pytest_report_header(config):
    return f"rng seed: {_seed(config)} (replay with --seed={_seed(config)})"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failure on random inputs names the seed that replays it."""
    report = yield
    if report.failed and "rng" in getattr(item, "fixturenames", ()):
        seed = _seed(item.config)
        report.sections.append(("rng seed", f"{seed}: replay with --seed={seed} "
                                            f"or GPU_REFINE_TEST_SEED={seed}"))
    return report


@pytest.fixture
def rng(request):
    """Fresh random inputs for each test, drawn from the session's seed and the test's id, so
    that one failing test replays alone with the seed its report names."""
    return np.random.default_rng([_seed(request.config), zlib.crc32(request.node.nodeid.encode())])
