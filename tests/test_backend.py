"""Backend choice and splitting a batch when device memory runs out."""
import os

import numpy as np
import pytest

from gpu_refine.backend import available_backends, get_backend
from gpu_refine.density import split_on_oom
from gpu_refine.errors import BackendError


def test_forced_numpy(monkeypatch):
    assert get_backend("numpy").name == "numpy"
    assert get_backend("numpy").ops.__name__ == "cpu_fallback"


def test_unknown_backend():
    with pytest.raises(BackendError, match="unknown backend"):
        get_backend("tpu")


def test_cupy_requested_without_gpu_is_a_clear_error():
    if "cupy" in available_backends():
        pytest.skip("a GPU is available here")
    with pytest.raises(BackendError, match="backend=cupy was requested"):
        get_backend("cupy")


def test_split_on_oom_halves_until_it_fits():
    bk = get_backend("numpy")
    done = np.zeros(10, int)

    def work(sl):
        if sl.stop - sl.start > 3:
            raise MemoryError
        done[sl] += 1

    assert split_on_oom(bk, 10, work) == 2
    assert np.all(done == 1)


def test_split_on_oom_keeps_no_chunk_where_memory_sufficed():
    """A batch that went through whole gives back the chunk it was given (None: no limit), so
    that a later, larger batch is not split into parts of its size."""
    bk = get_backend("numpy")
    calls = []
    assert split_on_oom(bk, 6, calls.append) is None
    assert split_on_oom(bk, 128, calls.append, None) is None
    assert calls == [slice(0, 6), slice(0, 128)]
    assert split_on_oom(bk, 4, calls.append, 8) == 8


_REPEATED_MAPS = """
import resource, sys
import os

import numpy as np
if sys.argv[1] == "backend":
    from gpu_refine.backend import get_backend
    get_backend("numpy")
from cpu_fallback import density_adjoint, spread_density
rng = np.random.default_rng(0)
nm, na, n, sp = 2, 1500, 56, 0.8
xyz = rng.uniform(4, 40, (nm, na, 3)).astype(np.float32)
b, occ = np.full((nm, na), 20.0, np.float32), np.ones((nm, na), np.float32)
coefs = np.array([[[0.5, 1.0, 1.5, 1.0, 0.5], [0.5, 3, 10, 30, 80]]])
stype, radius = np.zeros(na, np.int64), np.full((nm, na), 3.0, np.float32)
geom = np.concatenate([np.eye(3).ravel() / sp, np.eye(3).ravel() * sp, [0, 0, 0]])
out = np.zeros((nm, n, n, n), np.float32)
dmap = rng.normal(size=out.shape).astype(np.float32)
args = (xyz, b, None, None, occ, stype, coefs, radius, geom, 10.0, False)
for i in range(4):
    if i == 1:
        first = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    spread_density(*args, out)
    density_adjoint(*args, dmap)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - first)
"""


def test_numpy_backend_keeps_freed_memory_for_the_next_model_map():
    """glibc hands freed temporaries back to the system and faults them in again on the next
    call; the NumPy backend keeps them (mmap threshold and top pad set first thing, as the
    command line does), so repeated model maps and adjoints cost no page faults after the
    first."""
    import platform
    import subprocess
    import sys
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("these are glibc's malloc settings")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}

    def faults(how):
        run = subprocess.run([sys.executable, "-c", _REPEATED_MAPS, how], env=env,
                             capture_output=True, text=True, check=True)
        return int(run.stdout.split()[-1])
    plain, kept = faults("plain"), faults("backend")
    if plain < 5000:
        pytest.skip(f"this C library does not fault freed temporaries in again ({plain})")
    assert kept < 0.25 * plain, (kept, plain)


def test_malloc_settings_chosen_by_the_user_stand(monkeypatch):
    from cpu_fallback.allocator import keep_freed_memory
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert keep_freed_memory.__wrapped__() is False
