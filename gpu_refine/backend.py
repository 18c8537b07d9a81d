"""The one place where the array module and kernel provider are chosen.

``get_backend()`` returns CuPy + the CUDA kernels when CuPy imports and sees a device, else
NumPy + ``cpu_fallback``.  ``backend="numpy"|"cupy"`` or the environment variable
``GPU_REFINE_BACKEND`` forces one.  Nothing here imports CuPy at module import time.
"""
import functools
import logging
import os
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from .errors import BackendError, ParameterError

log = logging.getLogger(__name__)

_CHOICES = ("auto", "numpy", "cupy")


def to_host(a):
    """A NumPy array of ``a``, a NumPy or CuPy array (for code that holds only ``xp``)."""
    return a.get() if hasattr(a, "get") else np.asarray(a)


@dataclass(frozen=True)
class Backend:
    name: str           # "numpy" or "cupy"
    xp: ModuleType      # numpy or cupy
    ops: ModuleType     # cpu_fallback or gpu_refine.cuda: the kernel set
    device: str         # human-readable description for logs

    @property
    def is_gpu(self):
        return self.name == "cupy"

    def asarray(self, a, dtype=None):
        """A C-contiguous array of this backend (gemmi grids are Fortran-ordered views)."""
        return self.xp.ascontiguousarray(self.xp.asarray(a, dtype=dtype))

    def to_numpy(self, a):
        return to_host(a)

    def is_out_of_memory(self, exc):
        if not self.is_gpu:
            return isinstance(exc, MemoryError)
        return isinstance(exc, (self.xp.cuda.memory.OutOfMemoryError, MemoryError))

    def free_memory(self):
        if self.is_gpu:
            self.xp.get_default_memory_pool().free_all_blocks()


@functools.lru_cache(maxsize=None)
def _numpy_backend():
    import cpu_fallback
    from cpu_fallback.allocator import keep_freed_memory
    keep_freed_memory()
    return Backend("numpy", np, cpu_fallback, f"CPU (NumPy {np.__version__})")


def _cupy_backend():
    """CuPy backend, or the reason it cannot run."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install raising at import
        return None, f"CuPy is not importable ({exc.__class__.__name__}: {exc})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
        if n < 1:
            return None, "CuPy sees no CUDA device"
        cupy.zeros(1).sum().item()  # touches driver, context and a kernel launch
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    except Exception as exc:
        return None, f"CuPy cannot use the GPU ({exc.__class__.__name__}: {exc})"
    from . import cuda
    return Backend("cupy", cupy, cuda, f"GPU {name} (CuPy {cupy.__version__})"), None


@functools.lru_cache(maxsize=None)
def get_backend(name=None):
    """Backend by name ("auto", "numpy", "cupy"); None reads GPU_REFINE_BACKEND, else "auto"."""
    if isinstance(name, Backend):
        return name
    name = (name or os.environ.get("GPU_REFINE_BACKEND") or "auto").lower()
    if name not in _CHOICES:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(_CHOICES)}")
    if name == "numpy":
        return _numpy_backend()
    backend, why = _cupy_backend()
    if backend is not None:
        return backend
    if name == "cupy":
        raise BackendError(f"backend=cupy was requested but {why}")
    log.debug("using NumPy: %s", why)
    return _numpy_backend()


def check_environment():
    """ParameterError where an environment variable the engine reads asks for nothing it can
    do (GPU_REFINE_THREADS; GPU_REFINE_BACKEND is checked by ``get_backend``)."""
    value = os.environ.get("GPU_REFINE_THREADS", "").strip()
    if value:
        from cpu_fallback.density import threads_setting
        try:
            threads_setting(value)
        except ValueError as exc:
            raise ParameterError(str(exc)) from None


def available_backends():
    """Names of the backends that can run here (numpy always)."""
    names = ["numpy"]
    if _cupy_backend()[0] is not None:
        names.append("cupy")
    return names
