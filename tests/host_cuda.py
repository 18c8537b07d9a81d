"""The CUDA kernel provider (gpu_refine/cuda.py) with kernels/*.cu compiled for the host CPU.

Where no GPU is present, the GPU parity tests still run the real kernel sources and the real
launch code: ``gpu_refine.cuda`` is loaded against a stand-in for CuPy (cupy_standin.py, as
strict as CuPy about host and device arrays) whose RawModule compiles the source with a C++
compiler and ``host_cuda_shim.h`` (thread indices, atomicAdd, warp shuffles).  It checks
indexing, arithmetic and launch shapes, not what only a GPU shows (races between warps, device
memory, compiler differences).
"""
import ctypes
import functools
import hashlib
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import cupy_standin

HERE = Path(__file__).resolve().parent
SHIM = HERE / "host_cuda_shim.h"
CUDA_PY = HERE.parent / "gpu_refine" / "cuda.py"
_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)', re.S)


@functools.lru_cache(maxsize=None)
def compiler():
    """A C++ compiler that builds the shim (C++20: std::barrier, inline variables), or None."""
    for name in ("g++", "clang++"):
        path = shutil.which(name)
        if path is None:
            continue
        src = _build_dir() / "probe.cpp"
        src.write_text(f'#include "{SHIM}"\nint main() {{ return 0; }}\n')
        done = subprocess.run([path, "-std=c++20", "-pthread", "-fsyntax-only", str(src)],
                              capture_output=True)
        if done.returncode == 0:
            return path
    return None


def _param_type(param):
    """"const real_t* __restrict__ xyz" -> "const real_t*"."""
    words = param.replace("__restrict__", "").replace("*", "* ").split()
    return " ".join(words[:-1])


def _trampolines(code):
    """One exported launcher per kernel: (grid, block, void** args) as cuLaunchKernel."""
    out = []
    for name, params in _KERNEL.findall(code):
        types_ = [_param_type(p) for p in params.split(",") if p.strip()]
        call = ", ".join(f"*({t}*)args[{i}]" for i, t in enumerate(types_))
        out.append(f'extern "C" void host_launch_{name}(unsigned gx, unsigned gy, unsigned gz, '
                   f"unsigned bx, unsigned by, unsigned bz, void** args) {{\n"
                   f"  host_cuda::launch(gx, gy, gz, bx, by, bz, [&] {{ {name}({call}); }});\n}}")
    return "\n".join(out)


@functools.lru_cache(maxsize=None)
def _build_dir():
    return Path(tempfile.mkdtemp(prefix="gpu_refine_host_cuda_"))


@functools.lru_cache(maxsize=None)
def _library(code):
    warps = "#define HOST_CUDA_WARPS\n" if "__shfl" in code else ""
    source = f'{warps}#include "{SHIM}"\n{code}\n{_trampolines(code)}\n'
    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    src = _build_dir() / f"{key}.cpp"
    lib = src.with_suffix(".so")
    src.write_text(source)
    cmd = [compiler(), "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-o", str(lib),
           str(src)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"host build of a kernel failed:\n{done.stderr[-4000:]}")
    return ctypes.CDLL(str(lib))


def _pointer_to(arg, keep):
    """ctypes pointer to the value a kernel parameter receives (arrays: their data pointer).
    As CuPy's launcher does, a host (NumPy) array is refused."""
    if isinstance(arg, np.ndarray):
        raise TypeError("a NumPy array passed to a kernel (device arrays only)")
    if isinstance(arg, cupy_standin.ndarray):
        arg = arg._a
        if not arg.flags.c_contiguous:
            raise ValueError("kernel array arguments must be C-contiguous")
        value = ctypes.c_void_p(arg.ctypes.data)
    else:
        scalar = np.asarray(arg)
        ctype = {np.dtype(np.int32): ctypes.c_int32, np.dtype(np.int64): ctypes.c_int64,
                 np.dtype(np.float64): ctypes.c_double, np.dtype(np.float32): ctypes.c_float,
                 np.dtype(np.uint32): ctypes.c_uint32}[scalar.dtype]
        value = ctype(scalar.item())
    keep.append(value)
    return ctypes.cast(ctypes.pointer(value), ctypes.c_void_p)


class _Function:
    def __init__(self, lib, name):
        self._fn = getattr(lib, f"host_launch_{name}")
        self._fn.restype = None

    def __call__(self, grid, block, args):
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        keep = []
        ptrs = (ctypes.c_void_p * len(args))(*[_pointer_to(a, keep) for a in args])
        self._fn(*[ctypes.c_uint(int(v)) for v in grid + block], ptrs)


class _RawModule:
    """cupy.RawModule(code=..., options=...) compiled for the host."""

    def __init__(self, code, options=()):
        self._lib = _library(code)

    def get_function(self, name):
        return _Function(self._lib, name)


@functools.lru_cache(maxsize=None)
def standin_cupy():
    """The CuPy stand-in (cupy_standin.py) with RawModule compiling for the host."""
    return cupy_standin.module(_RawModule)


@functools.lru_cache(maxsize=None)
def host_kernels():
    """gpu_refine/cuda.py loaded against the host stand-in for CuPy (a separate module object;
    ``cupy`` stays absent from sys.modules)."""
    spec = importlib.util.spec_from_file_location("gpu_refine_cuda_on_host", CUDA_PY)
    module = importlib.util.module_from_spec(spec)
    saved = sys.modules.get("cupy")
    sys.modules["cupy"] = standin_cupy()
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            del sys.modules["cupy"]
        else:
            sys.modules["cupy"] = saved
    return module
