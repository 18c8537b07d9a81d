"""Backend choice and splitting a batch when device memory runs out."""
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
