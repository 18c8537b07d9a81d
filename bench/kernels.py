"""Static resource report of every kernel as CuPy builds it on an H200, without a GPU.

    python bench/kernels.py

Compiles each kernel module through NVRTC (sm_90 cubin, CuPy's options; the helper lives in
tests/nvrtc.py) with ptxas's verbose report, and prints per entry: registers per thread, stack
and spills, and the warps an SM can hold at the launch's block size, which bounds how much
memory latency the kernel can hide.  Speed itself needs the device (bench/device.sh).
"""
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import nvrtc  # noqa: E402  (test helper, found through the path above)
from gpu_refine.kernel_source import COMPILE_OPTIONS, MODULES, THREADS_PER_BLOCK  # noqa: E402

# Hopper (sm_90) per-SM limits: registers, resident warps and blocks; registers are given out
# per warp in units of 256.
_REGS, _WARPS, _BLOCKS, _UNIT = 65536, 64, 32, 256


def resident_warps(registers, threads=THREADS_PER_BLOCK):
    """Warps one SM holds for a kernel using ``registers`` per thread, blocks of ``threads``."""
    warps_per_block = -(-threads // 32)
    per_warp = -(-registers * 32 // _UNIT) * _UNIT
    blocks = min(_REGS // (per_warp * warps_per_block), _WARPS // warps_per_block, _BLOCKS)
    return blocks * warps_per_block


def main():
    if nvrtc.library() is None:
        sys.exit("NVRTC not found: pip install 'nvidia-cuda-nvrtc>=13,<14'")
    major, minor = nvrtc.version()
    print(f"# NVRTC {major}.{minor}, -arch={nvrtc.ARCH}, options "
          f"{' '.join(COMPILE_OPTIONS + nvrtc.CUPY_OPTIONS)}; block {THREADS_PER_BLOCK} threads; "
          f"host {platform.processor() or platform.machine()}")
    print("| module | kernel | real | registers | stack (B) | spills st/ld (B) | warps/SM | occupancy |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name in MODULES:
        for dtype in ("float32", "float64"):
            _, log = nvrtc.build_module(name, dtype)
            for entry, r in sorted(nvrtc.ptxas_resources(log).items()):
                warps = resident_warps(r.registers)
                print(f"| {name} | {entry} | {dtype} | {r.registers} | {r.stack} | "
                      f"{r.spill_stores}/{r.spill_loads} | {warps} | {warps / _WARPS:.0%} |")


if __name__ == "__main__":
    main()
