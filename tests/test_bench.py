"""The benchmarks run end to end (their smallest NumPy rows), so that a device session never
spends its few minutes on a script that no longer runs."""
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run(*args):
    p = subprocess.run([sys.executable, str(BENCH / args[0]), *args[1:]], capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def test_rsr_benchmark(shared):
    out = _run("rsr.py", "--data", str(shared), "--numpy-batches", "1", "--batches", "0")
    row = next(line for line in out.splitlines() if line.startswith("| gpu_refine numpy | 1 |"))
    assert float(row.split("|")[6]) > 0.84          # CCmask of the start
    assert "| program | batch | set-up | statistics | start | weight | macro-cycles |" in out


def test_restraints_benchmark(shared):
    out = _run("restraints.py", "--data", str(shared), "--batches", "1", "--repeat", "1")
    assert "CPU (NumPy" in out


def test_density_benchmark():
    out = _run("density.py", "--quick", "--repeat", "1")
    assert "| numpy |" in out


def test_convergence_benchmark(shared, tmp_path):
    out = _run("convergence.py", "--data", str(shared), "--maps", "8", "--fractions", "25",
               "--variant", "quick=macro_cycles=1", "--out", str(tmp_path))
    row = next(line for line in out.splitlines() if line.startswith("| quick | 8 | 25 |"))
    start, final = (float(x) for x in row.split("|")[4:6])
    assert final < start          # the fit moves toward the map's model
