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
import os
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


def kernel_signatures(code):
    """{kernel name: [parameter C type, ...]} of the ``extern "C"`` kernels in ``code``."""
    return {name: [_param_type(p) for p in params.split(",") if p.strip()]
            for name, params in _KERNEL.findall(code)}


_C_DTYPES = {"int": np.int32, "long long": np.int64, "unsigned int": np.uint32,
             "double": np.float64, "float": np.float32, "unsigned char": np.uint8,
             "signed char": np.int8, "bool": np.bool_}


def _expected_dtype(ctype, real):
    """The dtype a parameter of C type ``ctype`` takes (pointers: their element's), and
    whether it is a pointer."""
    base = ctype.replace("const ", "").strip()
    pointer = base.endswith("*")
    base = base.rstrip("*").strip()
    if base == "real_t":
        base = real
    return np.dtype(_C_DTYPES[base]), pointer


def _trampolines(code):
    """One exported launcher per kernel: (grid, block, void** args) as cuLaunchKernel."""
    out = []
    for name, types_ in kernel_signatures(code).items():
        call = ", ".join(f"*({t}*)args[{i}]" for i, t in enumerate(types_))
        out.append(f'extern "C" void host_launch_{name}(unsigned gx, unsigned gy, unsigned gz, '
                   f"unsigned bx, unsigned by, unsigned bz, void** args) {{\n"
                   f"  host_cuda::launch(gx, gy, gz, bx, by, bz, [&] {{ {name}({call}); }});\n}}")
    return "\n".join(out)


@functools.lru_cache(maxsize=None)
def _build_dir():
    return Path(tempfile.mkdtemp(prefix="gpu_refine_host_cuda_"))


# HOST_CUDA_SANITIZE=1 builds the kernels with AddressSanitizer and UBSan (the process must
# preload libasan: see tests/test_sanitizers.py).
_SANITIZE = (["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
              "-fno-sanitize-recover=all"] if os.environ.get("HOST_CUDA_SANITIZE") else [])


@functools.lru_cache(maxsize=None)
def _library(code):
    warps = "#define HOST_CUDA_WARPS\n" if "__shfl" in code else ""
    source = f'{warps}#include "{SHIM}"\n{code}\n{_trampolines(code)}\n'
    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    src = _build_dir() / f"{key}.cpp"
    lib = src.with_suffix(".so")
    src.write_text(source)
    cmd = [compiler(), "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", *_SANITIZE, "-o",
           str(lib), str(src)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"host build of a kernel failed:\n{done.stderr[-4000:]}")
    return ctypes.CDLL(str(lib))


def _pointer_to(arg, keep):
    """ctypes pointer to the value a kernel parameter receives (arrays: their data pointer).
    Arguments have been checked against the signature (``_Function._check``)."""
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
    """A launcher that checks every argument against the kernel's C signature.  The driver
    would read whatever bytes it is given (an int64 for an ``int`` happens to work on a
    little-endian GPU, a float32 array for ``double*`` gives garbage), so the stand-in is
    stricter than CuPy: count, kind and dtype must all match."""

    def __init__(self, lib, name, params, real):
        self._fn = getattr(lib, f"host_launch_{name}")
        self._fn.restype = None
        self._name = name
        self._expected = [(c, *_expected_dtype(c, real)) for c in params]

    def _check(self, args):
        if len(args) != len(self._expected):
            raise TypeError(f"{self._name}: {len(args)} arguments for "
                            f"{len(self._expected)} parameters")
        for i, (arg, (ctype, dtype, pointer)) in enumerate(zip(args, self._expected)):
            if isinstance(arg, np.ndarray):
                raise TypeError(f"{self._name}: argument {i} is a NumPy array (device arrays "
                                "only, as CuPy's launcher)")
            is_array = isinstance(arg, cupy_standin.ndarray)
            got = arg.dtype if is_array else np.asarray(arg).dtype
            if is_array != pointer or got != dtype:
                kind = "array" if is_array else "scalar"
                raise TypeError(f"{self._name}: argument {i} is a {got} {kind}, the "
                                f"parameter is {ctype}")

    def __call__(self, grid, block, args):
        self._check(args)
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        _check_launch_shape(self._name, grid, block)
        keep = []
        ptrs = (ctypes.c_void_p * len(args))(*[_pointer_to(a, keep) for a in args])
        self._fn(*[ctypes.c_uint(int(v)) for v in grid + block], ptrs)
        arrays = [a for a in args if isinstance(a, cupy_standin.ndarray)]
        cupy_standin.cost.launch(f"kernel {self._name}", sum(a._a.nbytes for a in arrays),
                                 _pairs(self._name, args))


def _pairs(name, args):
    """Atom × grid-point pairs a density kernel visits: the grid points inside each atom's
    sphere (the kernels solve each slab's rows and each row's points from the sphere), counted
    as its volume 4/3 pi r^3 over the voxel's |det xyz_from_index|, for the radius r
    (``radius``, argument 7) and ``geom`` (argument 8); 0 for other kernels."""
    if not name.startswith(("spread_density", "density_adjoint")):
        return 0
    radius, geom, n_models = args[7]._a, args[8]._a, int(args[12])
    voxel = abs(np.linalg.det(geom[9:18].reshape(3, 3)))
    spheres = (4.0 / 3.0 * np.pi * radius.astype(np.float64) ** 3).sum() / voxel
    return spheres * (n_models if radius.ndim == 1 else 1)


# CUDA's launch limits (compute capability 9.0): what cuLaunchKernel refuses at run time.
_GRID_MAX = (2**31 - 1, 65535, 65535)
_BLOCK_MAX = (1024, 1024, 64)


def _check_launch_shape(name, grid, block):
    if (any(not 1 <= g <= m for g, m in zip(grid, _GRID_MAX))
            or any(not 1 <= b <= m for b, m in zip(block, _BLOCK_MAX))
            or block[0] * block[1] * block[2] > 1024):
        raise ValueError(f"{name}: launch grid {grid} block {block} is outside CUDA's limits "
                         "(cudaErrorInvalidConfiguration on a device)")


class _RawModule:
    """cupy.RawModule(code=..., options=...) compiled for the host."""

    def __init__(self, code, options=()):
        self._lib = _library(code)
        self._signatures = kernel_signatures(code)
        real = re.search(r"^#define REAL (\w+)", code, re.M)
        self._real = real.group(1) if real else None

    def get_function(self, name):
        if name not in self._signatures:
            raise AttributeError(f"no kernel named {name} in the module")
        return _Function(self._lib, name, self._signatures[name], self._real)


@functools.lru_cache(maxsize=None)
def standin_cupy():
    """The CuPy stand-in (cupy_standin.py) with RawModule compiling for the host."""
    return cupy_standin.module(_RawModule)


@functools.lru_cache(maxsize=None)
def host_kernels():
    """gpu_refine/cuda.py loaded against the host stand-in for CuPy and cupyx (a separate
    module object; ``cupy`` and ``cupyx`` stay absent from sys.modules)."""
    spec = importlib.util.spec_from_file_location("gpu_refine._cuda_on_host", CUDA_PY)
    module = importlib.util.module_from_spec(spec)
    standins = {"cupy": standin_cupy(), **cupy_standin.cupyx_modules()}
    saved = {name: sys.modules.get(name) for name in standins}
    sys.modules.update(standins)
    try:
        spec.loader.exec_module(module)
    finally:
        for name, was in saved.items():
            if was is None:
                del sys.modules[name]
            else:
                sys.modules[name] = was
    return module
