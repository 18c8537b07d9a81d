"""Keep the memory that the NumPy kernels free for their next call (glibc only).

A model map or its adjoint allocates and frees tens of MB of temporaries per model.  glibc
hands the free top of a heap back to the system once it passes the trim threshold (twice the
dynamic mmap threshold, a few MB), so the next call page-faults the same memory in again: on a
1500-atom model with 2 cores, 1.6 M minor faults and 40 % of the wall time spent in the kernel.
A top pad (``M_TOP_PAD``) keeps that much free memory at the top of each heap instead; the
peak memory is the same, it is only not handed back between calls.
"""
import ctypes
import functools
import logging
import os
import platform

TOP_PAD = 256 << 20     # bytes; above the per-thread working set of a 2M-pair chunk
_M_TOP_PAD = -2         # mallopt parameter number (malloc.h)

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def keep_freed_memory(pad=TOP_PAD):
    """Set glibc's top pad to ``pad`` bytes, unless ``MALLOC_TOP_PAD_`` or the tunable
    ``glibc.malloc.top_pad`` already says how much to keep: the user's choice stands.  Returns the pad set, else None
    (another C library, or the choice left to the environment)."""
    if "MALLOC_TOP_PAD_" in os.environ or "glibc.malloc.top_pad" in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        ok = ctypes.CDLL(None).mallopt(_M_TOP_PAD, ctypes.c_int(pad))
    except (OSError, AttributeError):
        return None
    if not ok:
        return None
    log.debug("glibc malloc top pad set to %d MB", pad >> 20)
    return pad
