"""Every kernel module compiles through NVRTC as CuPy builds it on the H200 (same source, same
options, sm_90 cubin), every kernel that gpu_refine/cuda.py launches is in it, and ptxas's
resource report allows the launch: no spills, registers within the block's share."""
import re
from pathlib import Path

import pytest

import nvrtc
from gpu_refine.kernel_source import MODULES, THREADS_PER_BLOCK, module_source
from host_cuda import kernel_signatures

needs_nvrtc = pytest.mark.skipif(nvrtc.library() is None,
                                 reason="NVRTC not found (pip install nvidia-cuda-nvrtc)")

CUDA_PY = Path(__file__).resolve().parent.parent / "gpu_refine" / "cuda.py"
_REGISTERS_PER_SM = 65536


@needs_nvrtc
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", MODULES)
def test_module_compiles_through_nvrtc(name, dtype):
    cubin, log = nvrtc.build_module(name, dtype)
    assert "warning" not in log.lower(), log
    entries = list(kernel_signatures(module_source(name, dtype)))
    assert entries
    for entry in entries:
        assert b"\0" + entry.encode() + b"\0" in cubin, f"{entry} missing from the cubin"
    resources = nvrtc.ptxas_resources(log)
    assert sorted(resources) == sorted(entries)
    for entry, r in resources.items():
        assert r.spill_stores == 0 and r.spill_loads == 0, f"{entry} spills registers: {log}"
        assert r.registers * THREADS_PER_BLOCK <= _REGISTERS_PER_SM, f"{entry}: {r} "


def test_every_kernel_cuda_py_launches_is_defined():
    wanted = set(re.findall(r'"(\w+_kernel)"', CUDA_PY.read_text()))
    defined = {e for name in MODULES for e in kernel_signatures(module_source(name, "float64"))}
    assert wanted and wanted <= defined, wanted - defined


@needs_nvrtc
def test_a_syntax_error_is_reported_with_the_log():
    with pytest.raises(nvrtc.CompileError, match="error"):
        nvrtc.compile_cubin('extern "C" __global__ void k(int* x) { x[0] = ; }', ())
