"""The CUDA C source of each kernel module exactly as it is compiled: ``kernels/<name>.cu``
behind the one generated line ``#define REAL <type>``, and the compiler options.  Free of CuPy,
so that the sources can be checked where there is no GPU (NVRTC, the host build in tests)."""
from pathlib import Path

import numpy as np

MODULES = ("density", "interpolate", "restraints", "banded", "cc_target", "lbfgs")
COMPILE_OPTIONS = ("--std=c++14",)
# Threads per block of every launch (gpu_refine/cuda.py); the kernels take any multiple of 32.
THREADS_PER_BLOCK = 128
_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


def kernel_dir():
    """``kernels/`` beside the package in a source checkout, or inside it once installed."""
    here = Path(__file__).resolve().parent
    for cand in (here / "kernels", here.parent / "kernels"):
        if (cand / "density.cu").is_file():
            return cand
    raise FileNotFoundError("CUDA sources (kernels/*.cu) not found next to gpu_refine")


def real_dtype(dtype):
    """``dtype`` as a NumPy dtype, if the kernels are built for it (float32, float64)."""
    dtype = np.dtype(dtype)
    if dtype not in _CTYPES:
        raise TypeError(f"kernels take float32 or float64 arrays, not {dtype}")
    return dtype


def module_source(name, dtype):
    """The text compiled for module ``name`` (one of MODULES) in precision ``dtype``."""
    if name not in MODULES:
        raise ValueError(f"no kernel module {name!r}; there are {', '.join(MODULES)}")
    src = (kernel_dir() / f"{name}.cu").read_text()
    return f"#define REAL {_CTYPES[real_dtype(dtype)]}\n{src}"
