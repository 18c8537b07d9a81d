"""The CuPy stand-in must be as strict as CuPy (and, for kernel arguments, stricter than the
driver), or the GPU branches it runs would pass here and fail on a device."""
import numpy as np
import pytest

import host_cuda

pytestmark = pytest.mark.skipif(host_cuda.compiler() is None, reason="no C++20 compiler")

_SOURCE = """#define REAL double
typedef REAL real_t;
extern "C" __global__ void scale_kernel(const real_t* __restrict__ x, double s, int n,
                                        real_t* __restrict__ out) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = s * x[i];
}
"""


@pytest.fixture
def cp():
    return host_cuda.standin_cupy()


@pytest.fixture
def scale(cp):
    return cp.RawModule(code=_SOURCE).get_function("scale_kernel")


def test_device_arrays_do_not_turn_into_numpy_implicitly(cp):
    a = cp.arange(4.0)
    with pytest.raises(TypeError):
        np.asarray(a)
    with pytest.raises(TypeError):
        cp.add(a, np.ones(4))
    np.testing.assert_array_equal(a.get(), np.arange(4.0))
    assert cp.asnumpy(a.sum()).shape == ()


def test_a_kernel_launch_with_matching_arguments_runs(cp, scale):
    x = cp.arange(5.0)
    out = cp.full(5, np.nan)
    scale((1,), (8,), (x, np.float64(2.0), np.int32(5), out))
    np.testing.assert_array_equal(out.get(), 2 * np.arange(5.0))


@pytest.mark.parametrize("bad, message", [
    (lambda cp: (cp.arange(5.0), np.float64(2), np.int64(5), cp.empty(5)), "int64 scalar"),
    (lambda cp: (cp.arange(5.0), 2.0, 5, cp.empty(5)), "int64 scalar"),
    (lambda cp: (cp.arange(5, dtype=np.float32), np.float64(2), np.int32(5), cp.empty(5)),
     "float32 array"),
    (lambda cp: (cp.arange(5.0), np.float32(2), np.int32(5), cp.empty(5)), "float32 scalar"),
    (lambda cp: (cp.arange(5.0), np.float64(2), np.int32(5)), "3 arguments"),
    (lambda cp: (cp.arange(5.0), cp.zeros(()), np.int32(5), cp.empty(5)), "float64 array"),
])
def test_a_kernel_launch_with_mismatched_arguments_is_refused(cp, scale, bad, message):
    with pytest.raises(TypeError, match=message):
        scale((1,), (8,), bad(cp))


def test_host_arrays_are_refused_by_kernels(cp, scale):
    with pytest.raises(TypeError, match="NumPy array"):
        scale((1,), (8,), (np.arange(5.0), np.float64(2), np.int32(5), cp.empty(5)))
