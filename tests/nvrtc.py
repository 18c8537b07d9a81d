"""NVRTC through ctypes: compile a kernel module as CuPy's RawModule does on a device, without
a GPU.  NVRTC comes from the ``nvidia-cuda-nvrtc`` wheel (what ``cupy-cuda13x`` loads) or the
system; without it the checks that use this skip.

nvcc (CI compiles every ``.cu`` with it too) is not the same compiler front end: it includes the
host headers and the CUDA runtime header implicitly, NVRTC builds from the source alone, with
built-in device headers, the way the engine's kernels are built at run time.
"""
import ctypes
import ctypes.util
import functools
import re
from collections import namedtuple
from pathlib import Path

from gpu_refine.kernel_source import COMPILE_OPTIONS, module_source

# What CuPy (14) adds to a RawModule's options on an H200 (compute capability 9.0): flush
# denormals to zero, and a cubin built for the device's own architecture.
CUPY_OPTIONS = ("-ftz=true",)
ARCH = "sm_90"


def _candidates():
    try:
        import nvidia
    except ImportError:
        nvidia = None
    if nvidia is not None:
        for base in map(Path, nvidia.__path__):
            for pattern in ("cu*/lib/libnvrtc.so*", "cuda_nvrtc/lib/libnvrtc.so*"):
                yield from sorted(base.glob(pattern), reverse=True)
    name = ctypes.util.find_library("nvrtc")
    if name:
        yield name


@functools.lru_cache(maxsize=None)
def library():
    """The loaded NVRTC library, or None where none is found."""
    for path in _candidates():
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        return lib
    return None


def version():
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(library().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)))
    return major.value, minor.value


class CompileError(RuntimeError):
    """NVRTC refused the source; the message holds its log."""


def _check(status, log=""):
    if status != 0:
        what = library().nvrtcGetErrorString(status).decode()
        raise CompileError(f"{what}\n{log}".strip())


def _text(prog, size_fn, get_fn):
    size = ctypes.c_size_t()
    _check(size_fn(prog, ctypes.byref(size)))
    buf = ctypes.create_string_buffer(size.value)
    _check(get_fn(prog, buf))
    return buf.raw[:size.value]


def compile_cubin(source, options, name="kernel.cu"):
    """(cubin bytes, compiler log) for ``source``; CompileError with the log on failure."""
    lib = library()
    prog = ctypes.c_void_p()
    _check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None,
                                  None))
    try:
        opts = list(options) + list(CUPY_OPTIONS) + [f"-arch={ARCH}"]
        argv = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        status = lib.nvrtcCompileProgram(prog, len(opts), argv)
        log = _text(prog, lib.nvrtcGetProgramLogSize, lib.nvrtcGetProgramLog)
        log = log.rstrip(b"\0").decode(errors="replace")
        _check(status, log)
        return _text(prog, lib.nvrtcGetCUBINSize, lib.nvrtcGetCUBIN), log
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def build_module(name, dtype):
    """(cubin, log with ptxas's resource report) of kernel module ``name`` in ``dtype``, built
    from the text and options the engine's loader uses."""
    return compile_cubin(module_source(name, dtype), COMPILE_OPTIONS + ("--ptxas-options=-v",),
                         f"{name}.cu")


Resources = namedtuple("Resources", "registers stack spill_stores spill_loads")


def ptxas_resources(log):
    """{entry: Resources} from the log of a build with ``--ptxas-options=-v``."""
    out = {}
    for block in log.split("Compiling entry function")[1:]:
        entry = re.match(r"\s*'(\w+)'", block).group(1)
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                          r"(\d+) bytes spill loads", block)
        regs = re.search(r"Used (\d+) registers", block)
        out[entry] = Resources(int(regs.group(1)), *map(int, frame.groups()))
    return out
