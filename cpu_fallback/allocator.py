"""Keep the memory that the NumPy kernels free for their next call (glibc only).

A model map or its adjoint allocates and frees tens of MB of temporaries per model.  glibc
serves blocks above its mmap threshold (128 kB until a larger block is freed) with fresh
mappings and hands the free top of a heap back to the system past its trim threshold, so
each call page-faults the same memory in again: on a 1500-atom model with 2 cores, 1.6 M minor
faults and 40 % of the wall time spent in the kernel.  Blocks up to 32 MB (glibc's largest
mmap threshold) from the heaps, and 256 MB kept free at the top of each heap (the top pad,
which also bounds how far the worker threads' heaps shrink), keep it instead; the peak
memory is the same, it is only not handed back between calls.  The threshold is set
explicitly: a mallopt call freezes glibc's dynamic one where it stands, which early in a
process is at its 128 kB default.
"""
import ctypes
import functools
import logging
import os
import platform

MMAP_THRESHOLD = 32 << 20   # bytes: glibc's maximum on 64-bit systems
TOP_PAD = 256 << 20
_M_TOP_PAD, _M_MMAP_THRESHOLD = -2, -3   # mallopt parameter numbers (malloc.h)
_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def keep_freed_memory():
    """Set glibc's mmap threshold and top pad, unless the environment already chooses them
    (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_`` or a
    ``glibc.malloc`` tunable): the user's choice stands.  Returns True where they were set."""
    if any(k in os.environ for k in _ENVIRONMENT) or \
            "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
        ok = (mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(MMAP_THRESHOLD))
              and mallopt(_M_TOP_PAD, ctypes.c_int(TOP_PAD)))
    except (OSError, AttributeError):
        return False
    if ok:
        log.debug("glibc malloc: mmap threshold %d MB, top pad %d MB",
                  MMAP_THRESHOLD >> 20, TOP_PAD >> 20)
    return bool(ok)
