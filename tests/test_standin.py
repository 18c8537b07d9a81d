"""The CuPy stand-in must be as strict as CuPy (and, for kernel arguments, stricter than the
driver), or the GPU branches it runs would pass here and fail on a device."""
import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import cpu_fallback
import cupy_standin
import host_cuda
from helpers import ortho_box_spec, random_atoms

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
    if host_cuda.compiler() is None:
        pytest.skip("no C++20 compiler")
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


@pytest.fixture
def api_cp():
    """The stand-in's array module alone (no kernels, no compiler needed)."""
    return cupy_standin.module()


@pytest.mark.parametrize("call, message", [
    (lambda cp, a: cp.geomspace(1.0, 2.0, 3), "no attribute 'geomspace'"),  # NumPy only
    (lambda cp, a: cp.max(a, initial=0.0), "initial"),           # cupy.amax has no initial=
    (lambda cp, a: cp.exp(a, where=a > 0), "where"),             # CuPy ufuncs: no where=
    (lambda cp, a: cp.fft.rfftn(a, workers=2), "workers"),       # scipy.fft keyword
    (lambda cp, a: a.setflags(write=False), "no attribute 'setflags'"),
    (lambda cp, a: cp.add.at(a, [0], 1.0, 2.0), "at most 3 positional"),
    (lambda cp, a: cp.linalg.norm(a), "no cupy.linalg"),
])
def test_what_cupy_lacks_is_refused(api_cp, call, message):
    with pytest.raises((AttributeError, TypeError), match=message):
        call(api_cp, api_cp.arange(4.0))


def test_what_cupy_has_works(api_cp):
    cp = api_cp
    a = cp.arange(4.0)
    cp.add.at(a, cp.asarray([0, 0]), 1.0)
    assert float(cp.maximum(a, 2.0, out=a).sum(axis=0, keepdims=True)[0]) == 9.0
    assert cp.fft.rfftn(a.reshape(2, 2), s=(2, 2)).shape == (2, 2)
    assert a.astype(np.float32, copy=False).dtype == np.float32
    assert int(cp.bincount(cp.asarray([1, 1, 3]), minlength=5)[1]) == 2


@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="CuPy not installed")
def test_the_api_snapshot_matches_the_installed_cupy(tmp_path):
    """After a CuPy upgrade, ``python tools/cupy_api_snapshot.py`` renews tests/cupy_api.json."""
    import cupy
    if cupy.__version__ != cupy_standin.API["cupy_version"]:
        pytest.skip(f"snapshot of CuPy {cupy_standin.API['cupy_version']}, "
                    f"installed {cupy.__version__}")
    tool = pathlib.Path(__file__).resolve().parent.parent / "tools" / "cupy_api_snapshot.py"
    out = tmp_path / "api.json"
    subprocess.run([sys.executable, str(tool), str(out)], check=True, capture_output=True)
    assert json.loads(out.read_text()) == cupy_standin.API


@pytest.mark.parametrize("grid, block", [((1, 70000), (8,)), ((0,), (8,)), ((1,), (2048,))])
def test_a_launch_outside_cudas_limits_is_refused(cp, scale, grid, block):
    x = cp.arange(5.0)
    with pytest.raises(ValueError, match="outside CUDA's limits"):
        scale(grid, block, (x, np.float64(2.0), np.int32(5), cp.empty(5)))


def test_cost_counters_count_a_known_sequence(cp):
    """bench/gpu_cost.py's counters: a known sequence of device operations gives known
    numbers (uploads and their bytes, launches and the bytes they touch, syncs; views and
    copy-free conversions cost nothing)."""
    cost = cupy_standin.cost
    cost.reset()
    a = cp.asarray(np.ones(10, np.float32))             # upload, 40 bytes
    assert (cost.uploads, cost.upload_bytes, cost.launches) == (1, 40, 0)
    b = a * 2                                           # elementwise: reads 40, writes 40
    assert (cost.launches, cost.bytes) == (1, 80)
    a.reshape(2, 5)[0]                                  # views: free
    cp.asarray(b)                                       # already on the device: free
    b.astype(cp.float32, copy=False)
    assert cost.launches == 1
    s = b.sum()                                         # reduction: reads 40, writes 4
    assert (cost.launches, cost.bytes, cost.syncs) == (2, 124, 0)
    assert float(s) == 20.0 and cost.syncs == 1         # a value brought to the host
    b.get()
    bool(s > 0)                                         # one more launch, one more sync
    assert (cost.syncs, cost.launches) == (3, 3)
    b[cp.asarray(np.array([1, 2]))]                     # a gather: an upload and a launch
    assert (cost.uploads, cost.launches) == (2, 4)
    snap = cost.snapshot()
    assert snap["launches"] == 4 and snap["pairs"] == 0


def test_cost_counts_a_raw_kernel_and_its_bytes(cp):
    cost = cupy_standin.cost
    kernel = cp.RawModule(code=_SOURCE).get_function("scale_kernel")
    x = cp.asarray(np.arange(64, dtype=np.float64))
    out = cp.empty(64, dtype=cp.float64)                # allocation: free
    cost.reset()
    kernel((1,), (64,), (x, np.float64(2.0), np.int32(64), out))
    assert (cost.launches, cost.bytes, cost.syncs) == (1, 1024, 0)
    assert cost.by_name == {"kernel scale_kernel": [1, 1024]}
    np.testing.assert_array_equal(out.get(), 2 * np.arange(64))


def test_cost_counts_the_passes_cupy_adds_to_a_transform(cp):
    """rfftn: the transform alone; irfftn: a copy of its input (cuFFT overwrites a complex-to-
    real transform's input), the transform, and the 1/N scaling unless norm='forward'."""
    cost = cupy_standin.cost
    x = cp.asarray(np.ones((4, 6, 8), np.float32))
    cost.reset()
    f = cp.fft.rfftn(x)
    assert cost.launches == 1
    cost.reset()
    cp.fft.irfftn(f, s=x.shape)
    assert sorted(cost.by_name) == ["cupy.fft.irfftn", "cupy.fft.irfftn input copy",
                                    "cupy.fft.irfftn scaling"]
    assert cost.by_name["cupy.fft.irfftn scaling"][1] == 2 * x.nbytes
    cost.reset()
    back = cp.fft.irfftn(f, s=x.shape, norm="forward")
    assert cost.launches == 2
    np.testing.assert_allclose(back.get(), 192.0)


def test_cost_counts_density_pairs_as_the_spheres_points(cp):
    """A density launch's pairs: each atom's sphere volume in voxels (4/3 pi r^3 / voxel)."""
    spec = ortho_box_spec()
    rng = np.random.default_rng(1)
    xyz, b, u, flag, occ, stype, coefs = random_atoms(rng, 2, 7, spec, False, np.float64)
    radius = cpu_fallback.cutoff_radii(b, None, None, stype, coefs, 5.0, 1e-5, np.empty_like(b))
    ops = host_cuda.host_kernels()
    cost = cupy_standin.cost
    dev = [cp.asarray(a) for a in (xyz, b, occ, radius)]
    out = cp.empty((2,) + spec.shape, cp.float64)
    cost.reset()
    ops.spread_density(dev[0], dev[1], None, None, dev[2], stype, coefs, dev[3], spec.geom,
                       5.0, spec.periodic_axes, out)
    voxel = abs(np.linalg.det(spec.geom[9:18].reshape(3, 3)))
    assert abs(cost.pairs - (4 / 3 * np.pi * radius**3).sum() / voxel) <= 1    # counted whole
