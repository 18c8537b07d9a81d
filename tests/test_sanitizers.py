"""The CUDA kernels, built for the host, under AddressSanitizer and UBSan.

compute-sanitizer needs a GPU; on the host the same sources, driven by the engine's own launch
code through the CuPy stand-in, can run with g++'s sanitizers instead: a read or write past an
array (NumPy's buffers come from the intercepted malloc, each with its red zone) or undefined
behaviour (signed overflow, a bad shift) stops the run.  The sanitized runs go in a child
process that preloads the sanitizer runtime (and libstdc++, which gemmi's exceptions need)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import host_cuda

HERE = Path(__file__).resolve().parent

# The GPU parity tests and the engine's GPU branches (targets, the rsr workflow) on the stand-in.
SANITIZED_TESTS = ["tests/test_kernels.py", "tests/test_restraint_kernels.py",
                   "tests/test_targets.py",
                   "tests/test_rsr.py::test_strategies_on_the_example"]

_PLANTED = '''
import sys
sys.path.insert(0, {tests!r})
import numpy as np
import host_cuda
cp = host_cuda.standin_cupy()
source = """#define REAL double
typedef REAL real_t;
extern "C" __global__ void off_by_one(const real_t* __restrict__ x, int n,
                                      real_t* __restrict__ out) {{
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) out[i] = 2 * x[i < n ? i : 0];
}}
"""
kernel = cp.RawModule(code=source).get_function("off_by_one")
kernel((1,), (8,), (cp.arange(5.0), np.int32(5), cp.empty(5)))
'''


def _runtime(name):
    path = subprocess.run([host_cuda.compiler(), f"-print-file-name={name}"],
                          capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.fixture(scope="module")
def sanitized_env():
    compiler = host_cuda.compiler()
    if compiler is None or not os.path.basename(compiler).startswith("g++"):
        pytest.skip("needs g++ (its libasan) to build the kernels for the host")
    asan, stdcxx = _runtime("libasan.so"), _runtime("libstdc++.so.6")
    if asan is None or stdcxx is None:
        pytest.skip("g++'s AddressSanitizer runtime is not installed")
    return dict(os.environ, LD_PRELOAD=f"{asan} {stdcxx}", HOST_CUDA_SANITIZE="1",
                ASAN_OPTIONS="detect_leaks=0", PYTHONUNBUFFERED="1")


def test_an_out_of_bounds_write_is_caught(sanitized_env):
    """The harness itself: a kernel that writes one element past its output is stopped."""
    done = subprocess.run([sys.executable, "-c", _PLANTED.format(tests=str(HERE))],
                          env=sanitized_env, capture_output=True, text=True)
    assert done.returncode != 0
    assert "heap-buffer-overflow" in done.stderr and "WRITE of size 8" in done.stderr


def test_kernels_run_clean_under_the_sanitizers(sanitized_env):
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-k", "standin", *SANITIZED_TESTS],
                          cwd=HERE.parent, env=sanitized_env, capture_output=True, text=True)
    report = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0, report
    assert " passed" in done.stdout and " failed" not in done.stdout, report
