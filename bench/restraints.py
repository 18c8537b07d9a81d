"""Restraint energy + gradient speed: 4iid (14.8k atoms, 14k bonds) × batch 1 / 32 / 256.

Rows: the NumPy fallback, CuPy (where it sees a device) and, as the CPU peer, gemmi's own
per-restraint evaluation (Topo.calculate_z over every bond/angle/torsion/chirality: values
only, no gradients, one model at a time).  Coordinates are the deposited ones shaken by 0.1 Å
per model; the nonbonded pair list is built once before timing (it is reused while atoms move
less than half its margin, as in a minimisation).

    python bench/restraints.py [--data ../shared/data] [--batches 1,32,256] [--repeat 5]
"""
import argparse
import io
import platform
import time
from pathlib import Path

import gemmi
import numpy as np

from gpu_refine.backend import available_backends, get_backend
from gpu_refine.model import read_model
from gpu_refine.restraints.geometry import GeometryRestraints
from gpu_refine.restraints.topology import build_topology


def timed(fn, repeat, sync):
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - t) / repeat


def gemmi_time(model, monlib):
    st = model.structure.clone()
    lib = gemmi.read_monomer_lib(str(monlib) + "/", st[0].get_all_residue_names())
    topo = gemmi.prepare_topology(st, lib, warnings=io.StringIO(), ignore_unknown_links=True)

    def run():
        for group in (topo.bonds, topo.angles, topo.torsions):
            for t in group:
                t.calculate_z()
        for c in topo.chirs:
            c.calculate()
    t = time.perf_counter()
    run()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    data = Path(args.data)
    model = read_model(data / "xray" / "4iid" / "4iid.pdb")
    topo = build_topology(model, monlib=data / "monomers")
    c = topo.counts()
    print(f"# 4iid: {model.n_atoms} atoms, {c['n_bonds']} bonds, {c['n_angles']} angles, "
          f"{c['n_torsions']} torsions, {c['n_chirals']} chirals, {c['n_planes']} planes")
    print(f"# CPU: {platform.processor() or platform.machine()}, {platform.python_version()}")
    rows = []
    t_gemmi = gemmi_time(model, data / "monomers")
    rows.append(("gemmi Topo (values only)", 1, t_gemmi * 1e3, 1 / t_gemmi))
    rng = np.random.default_rng(0)
    for name in available_backends():
        bk = get_backend(name)
        sync = (lambda: bk.xp.cuda.Stream.null.synchronize()) if bk.is_gpu else (lambda: None)
        for n in [int(x) for x in args.batches.split(",")]:
            if name == "numpy" and n > 32:
                continue   # minutes per call; the per-model cost is flat beyond 32
            restraints = GeometryRestraints(topo, backend=bk, dtype=np.float32)
            xyz = bk.asarray(model.xyz[None] + rng.normal(scale=0.1, size=(n,) + model.xyz.shape),
                             dtype=np.float32)
            restraints.update_pairs(xyz, force=True)
            t = timed(lambda: restraints.energy_and_gradient(xyz), args.repeat, sync)
            rows.append((f"{bk.device} float32", n, t * 1e3 / n, n / t))
            print(f"# {name} batch {n}: {len(restraints.pairs.pairs)} nonbonded pairs",
                  flush=True)
    print(f"{'implementation':52s} {'batch':>6s} {'ms/model':>10s} {'models/s':>10s}")
    for label, n, ms, rate in rows:
        print(f"{label:52s} {n:6d} {ms:10.3f} {rate:10.1f}")


if __name__ == "__main__":
    main()
