"""Convergence radius of real-space refinement on real conformational differences (2AXD, NMR).

From ../shared/data/nmr/2axd (12 models): residues 13-65 without H, every B 60 Å².  Maps of
models 5, 8 and 11 (gemmi's electron density, its sampling blur undone, cut at 3 Å, 10 %
Gaussian noise) share one P1 box.  The starts are model 1 and, for each map, model 1 moved
25 / 50 / 100 / 150 % of the way from the map's model to it.  Each row refines one start
against one map and gives the Cα rms (no superposition) to the map's model and to the other
two, the geometry (by the project's built-in dictionary, with which gpu_refine refines by
default, and by the CCP4 library that Servalcat is given) and the wall time.

    python bench/convergence.py [--data ../shared/data] [--maps 5,8,11] [--fractions 25,50,100,150]
        [--variant NAME=key=value,key=value ...] [--servalcat PATH] [--out DIR]

Variants (gpu_refine's settings) default to the defaults and the two annealing strategies;
``--servalcat`` names the executable of Servalcat's ``refine_spa_norefmac`` (its default
cycles, with the same monomer library) for the same rows.
"""
import argparse
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import gemmi
import numpy as np

import gpu_refine as gr
from gpu_refine.backend import get_backend
from gpu_refine.workflows.geometry import geometry_report

FIRST, LAST, B, D, NOISE, SPACING, PAD = 13, 65, 60.0, 3.0, 0.1, 1.0, 10.0
VARIANTS = {
    "default": {},
    "+simulated_annealing": {"strategy": "minimization_global+resolution_annealing+adp"
                                         "+simulated_annealing"},
}


def core(st, index):
    """Model ``index`` (0-based), residues FIRST-LAST, no H, every B = B, as one Structure."""
    out = gemmi.Structure()
    out.add_model(st[index].clone())
    out.remove_hydrogens()
    for ch in out[0]:
        for k in reversed(range(len(ch))):
            if not FIRST <= ch[k].seqid.num <= LAST:
                del ch[k]
    for cra in out[0].all():
        cra.atom.b_iso, cra.atom.occ = B, 1.0
    out.remove_empty_chains()
    out.setup_entities()
    return out


def xyz_of(st):
    return np.array([cra.atom.pos.tolist() for cra in st[0].all()])


def with_xyz(st, xyz):
    out = st.clone()
    for cra, x in zip(out[0].all(), xyz):
        cra.atom.pos = gemmi.Position(*x)
    return out


def ca_rms(a, b):
    ca = [i for i, cra in enumerate(a[0].all()) if cra.atom.name == "CA"]
    return float(np.sqrt(((xyz_of(a)[ca] - xyz_of(b)[ca]) ** 2).sum(1).mean()))


def simulated_map(st, cell, n, origin, rng):
    """Density of ``st`` on the box (an n³ P1 cell whose corner is ``origin``), cut at D."""
    moved = st.clone()
    for cra in moved[0].all():
        cra.atom.pos = gemmi.Position(*(np.array(cra.atom.pos.tolist()) - origin))
    dc = gemmi.DensityCalculatorE()
    dc.d_min = D
    dc.set_refmac_compatible_blur(moved[0])
    dc.grid.set_unit_cell(cell)
    dc.grid.spacegroup = gemmi.SpaceGroup("P 1")
    dc.grid.set_size(n, n, n)
    dc.add_model_density_to_grid(moved[0])
    dc.grid.symmetrize_sum()
    f = np.fft.rfftn(np.array(dc.grid, copy=True).astype(np.float64))
    h = np.fft.fftfreq(n, 1.0 / n)
    s2 = (h[:, None, None] ** 2 + h[None, :, None] ** 2
          + np.fft.rfftfreq(n, 1.0 / n)[None, None, :] ** 2) / cell.a ** 2
    f *= np.exp(dc.blur * s2 / 4.0)
    f[s2 > 1.0 / D ** 2] = 0.0
    rho = np.fft.irfftn(f, s=(n, n, n), axes=(0, 1, 2))
    return (rho + rng.normal(scale=NOISE * rho.std(), size=rho.shape)).astype(np.float32)


def make_case(data, maps, fractions, out):
    ens = gemmi.read_structure(str(data / "nmr" / "2axd" / "2axd.pdb"))
    start = core(ens, 0)
    targets = {k: core(ens, k - 1) for k in maps}
    every = np.concatenate([xyz_of(core(ens, i)) for i in range(len(ens))])
    lo = np.floor(every.min(0) - PAD)
    n = int(np.ceil((every.max(0) - lo + PAD).max() / SPACING))
    n += n % 2
    cell = gemmi.UnitCell(n * SPACING, n * SPACING, n * SPACING, 90, 90, 90)
    rng = np.random.default_rng(2024)
    # Placed by NSTART (the box corner lies on the grid), which every program reads; Servalcat
    # ignores MRC ORIGIN.
    spec = gr.GridSpec(cell=tuple(cell.parameters), sampling=(n, n, n), shape=(n, n, n),
                       start=tuple(int(v) for v in np.round(lo / SPACING)), spacegroup="P 1")
    rows = []
    for k, target in targets.items():
        path = out / f"map_{k}.mrc"
        gr.write_map(path, simulated_map(target, cell, n, lo, rng), spec, overwrite=True)
        target.write_pdb(str(out / f"model_{k}.pdb"))
        for f in fractions:
            xyz = xyz_of(target) + f / 100.0 * (xyz_of(start) - xyz_of(target))
            model = with_xyz(start, xyz)
            name = out / f"start_{k}_{f}.pdb"
            model.write_pdb(str(name))
            rows.append((k, f, name, path))
    return targets, rows


def geometry(st, monlib=None):
    """(bonds Å, angles °) rmsd by the project's built-in dictionary, or by ``monlib``."""
    _, (r,) = geometry_report(gr.Model.from_gemmi(st), monlib=monlib)
    return r["rmsd_bonds"], r["rmsd_angles"]


def run_gpu_refine(start, emap, settings):
    model = gr.read_model(start)
    t0 = time.perf_counter()
    result = gr.refine_real_space(model, gr.read_map(emap), D, **settings)
    return result.batch.to_structures()[result.best], time.perf_counter() - t0


def run_servalcat(exe, start, emap, monlib, workdir):
    prefix = workdir / f"sv_{Path(start).stem}"
    t0 = time.perf_counter()
    subprocess.run([exe, "refine_spa_norefmac", "--model", str(start), "--map", str(emap),
                    "-d", str(D), "--monlib", monlib, "-o", str(prefix)], cwd=workdir,
                   check=True, capture_output=True, text=True)
    took = time.perf_counter() - t0
    out = next(p for p in (Path(f"{prefix}.mmcif"), Path(f"{prefix}.pdb")) if p.exists())
    st = gemmi.read_structure(str(out))
    st.remove_hydrogens()
    return st, took


def _value(text):
    """A --variant value as the settings take it: bool, int, float or the text."""
    if text in ("true", "false"):
        return text == "true"
    if text.isdigit():
        return int(text)
    return float(text) if text.replace(".", "", 1).isdigit() else text


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--maps", default="5,8,11")
    ap.add_argument("--fractions", default="25,50,100,150")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=key=value,key=value (gpu_refine settings); replaces the defaults")
    ap.add_argument("--servalcat", help="Servalcat executable")
    ap.add_argument("--servalcat-only", action="store_true", help="no gpu_refine rows")
    ap.add_argument("--out", help="keep the case and outputs here (default: a temporary folder)")
    args = ap.parse_args()
    data = Path(args.data)
    monlib = str(data / "monomers")
    variants = VARIANTS
    if args.variant:
        variants = {}
        for text in args.variant:
            name, _, rest = text.partition("=")
            pairs = [kv.split("=", 1) for kv in rest.split(",") if kv]
            variants[name] = {k: _value(v) for k, v in pairs}
    out = Path(args.out or tempfile.mkdtemp(prefix="convergence_"))
    out.mkdir(parents=True, exist_ok=True)
    maps = [int(k) for k in args.maps.split(",")]
    fractions = [int(f) for f in args.fractions.split(",")]
    targets, rows = make_case(data, maps, fractions, out)
    print(f"# 2AXD residues {FIRST}-{LAST}, maps of models {args.maps} at {D} Å (B {B:g}, "
          f"noise {NOISE:g}); {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; {get_backend().device}")
    print("| program | map | start (% of the way) | start Cα rms | final Cα rms | to the "
          "others | bonds Å | angles ° | CCP4 library: bonds Å | angles ° | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    programs = [] if args.servalcat_only else list(variants.items())
    if args.servalcat:
        programs.append(("servalcat", None))
    for name, settings in programs:
        for k, f, path, emap in rows:
            if name == "servalcat":
                refined, took = run_servalcat(args.servalcat, path, emap, monlib, out)
            else:
                refined, took = run_gpu_refine(path, emap, settings)
            first = gemmi.read_structure(str(path))
            others = ", ".join(f"{j}: {ca_rms(refined, t):.3f}" for j, t in targets.items()
                               if j != k)
            geo = geometry(refined) + geometry(refined, monlib)
            print(f"| {name} | {k} | {f} | {ca_rms(first, targets[k]):.3f} | "
                  f"{ca_rms(refined, targets[k]):.3f} | {others} | "
                  + " | ".join(f"{v:.4f}" if j % 2 == 0 else f"{v:.2f}"
                               for j, v in enumerate(geo)) + f" | {took:.1f} |", flush=True)


if __name__ == "__main__":
    main()
