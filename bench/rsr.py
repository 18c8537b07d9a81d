"""Real-space refinement speed and result: EMD-2566 / 3J6B chain 9 (3.2 Å), batch 1 / 16 / 128.

The start is the issue's: the deposited chain without H, shaken by 0.5 Å rms (default_rng(0)
normal deviates scaled to exactly 0.5 Å, drawn row by row, so model 1 of a batch is that
start).  Each row refines a batch with the default ``strategy`` (sites with resolution
annealing, ADP) and the automatic weight, and reports wall time, time per model, CCmask (our map_model_cc twin) and geometry,
then where the time went (set-up: map box, masks and topology; statistics: CCmask at start
and end; start: regularisation and B; weight: the automatic search; macro-cycles).  The CPU peer is Servalcat
``refine_spa_norefmac`` (10 cycles, sites + B) from the same start when ``--servalcat`` names
its executable; its map gets the MRC ORIGIN moved into NSTART, which Servalcat reads.
``--cctbx PYTHON`` (a Python with cctbx-base) adds every row's CCmask by mmtbx's
map_model_cc, the issue's measure, next to ours.

    python bench/rsr.py [--data ../shared/data] [--batches 1,16,128] [--numpy-batches 1]
                        [--servalcat PATH] [--cctbx PYTHON] [--repeat R] [--weights W1,W2,...]

With ``--weights`` (a weight grid, as ``gpu-refine rsr weight=W1,W2,...``) each start of a row is
refined with each weight instead of the automatic weight: the row's batch is starts × weights,
and the table gives each weight's CCmask and geometry (model 1's start).

With ``--repeat R`` every row runs R times, the rows taking turns (so that a machine that slows
down for a while slows all of them alike), and the median wall time is reported with the range.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gemmi
import numpy as np

from gpu_refine.backend import available_backends, get_backend
from gpu_refine.maps import read_map, write_map
from gpu_refine.model import Model
from gpu_refine.workflows.geometry import geometry_report, shaken_batch
from gpu_refine.workflows.validate import validate
from gpu_refine.workflows.rsr import RSRSettings, RealSpaceRefinement

EMD = Path("cryoem") / "emd2566_3j6b_chain9"


def load(data):
    st = gemmi.read_structure(str(data / EMD / "3J6B_9.pdb"))
    st.remove_hydrogens()
    st.setup_entities()
    return Model.from_gemmi(st), read_map(data / EMD / "2566_3J6B_9.mrc")


# mmtbx.maps.map_model_cc's CCmask of each model file, printed one per line: the peer's
# metric of the issue (run by a Python with cctbx-base, which must not import gemmi first).
CCTBX_CC_MASK = """
import sys
import iotbx.mrcfile, iotbx.pdb
from mmtbx.maps import map_model_cc
reader = iotbx.mrcfile.map_reader(file_name=sys.argv[1])
params = map_model_cc.master_params().extract().map_model_cc
params.resolution = float(sys.argv[2])
params.scattering_table = "electron"
for path in sys.argv[3:]:
    hierarchy = iotbx.pdb.input(file_name=path).construct_hierarchy()
    for atom in hierarchy.atoms():   # its electron table has no ions (e.g. OXT as O1-)
        atom.set_charge("  ")
    task = map_model_cc.map_model_cc(map_data=reader.map_data(), pdb_hierarchy=hierarchy,
                                     crystal_symmetry=reader.crystal_symmetry(), params=params)
    task.validate()
    task.run()
    print(task.get_results().cc_mask)
"""


def write_nstart_map(path, map_data):
    """The map with its ORIGIN moved into NSTART, which Servalcat and cctbx read."""
    spec = map_data.spec
    voxel = np.asarray(spec.voxel_size)
    nstart = tuple(int(round(o / v)) for o, v in zip(spec.origin, voxel))
    moved = type(spec)(cell=spec.cell, sampling=spec.sampling, shape=spec.shape,
                       start=nstart, origin=(0.0, 0.0, 0.0))
    write_map(path, map_data.data, moved)


def cctbx_cc_mask(python, structures, map_data):
    """CCmask of each gemmi Structure, without its H, by cctbx's map_model_cc, run by
    ``python`` (hydrogens removed here: cctbx's own removal leaves its atom selection stale)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_nstart_map(tmp / "map.mrc", map_data)
        files = []
        for i, st in enumerate(structures):
            files.append(str(tmp / f"model{i}.pdb"))
            st = st.clone()
            st.remove_hydrogens()
            st.write_pdb(files[-1])
        p = subprocess.run([python, "-c", CCTBX_CC_MASK, str(tmp / "map.mrc"), "3.2", *files],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError("cctbx map_model_cc failed: " + p.stderr[-500:])
        return np.array([float(x) for x in p.stdout.split()])


def run_ours(model, map_data, monlib, backend, n, weights=None):
    """(wall s, per-model stats, seconds per phase: the set-up, then those of the run, the
    refined models as gemmi Structures)."""
    settings = RSRSettings(resolution=3.2, monlib=str(monlib), weight=weights)
    t = time.perf_counter()
    job = RealSpaceRefinement(model, map_data, settings, backend=backend,
                              starts=shaken_batch(model, n, 0.5, seed=0, backend=backend))
    setup = time.perf_counter() - t
    result = job.run()
    wall = time.perf_counter() - t
    return wall, result.stats, {"set-up": setup, **result.phases}, result.batch.to_structures()


def run_servalcat(exe, model, map_data, monlib):
    """Servalcat from the seed-0 start; returns (wall s, CCmask, bonds, angles) by our metrics
    and the refined model (a gemmi Structure, without H)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = shaken_batch(model, 1, 0.5, seed=0, backend="numpy")
        st = start.to_structures()[0]
        st.write_pdb(str(tmp / "start.pdb"))
        write_nstart_map(tmp / "map.mrc", map_data)
        cmd = [exe, "refine_spa_norefmac", "--model", "start.pdb", "--map", "map.mrc",
               "--resolution", "3.2", "--ncycle", "10", "--monlib", str(monlib),
               "--output_prefix", "out"]
        env = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count()))
        t = time.perf_counter()
        p = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t
        if p.returncode != 0:
            raise RuntimeError("servalcat failed: " + p.stderr[-500:])
        out = gemmi.read_structure(str(tmp / "out.pdb"))
        out.remove_hydrogens()
        out.setup_entities()
        refined = Model.from_gemmi(out)
        cc = validate(refined, map_data, 3.2, backend="numpy")[0]["cc_mask"]
        geo = geometry_report(refined, monlib=str(monlib))[1][0]
        return wall, cc, geo["rmsd_bonds"], geo["rmsd_angles"], out


def hardware():
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus = ", ".join(get_backend(n).device for n in available_backends())
    return f"{cpu}, {os.cpu_count()} cores; backends: {gpus}"


def _sizes(text):
    """Batch sizes from "1,16,128"; "0" or "" for none."""
    try:
        sizes = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of batch sizes: {text!r}") from None
    if any(b < 0 for b in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be positive: {text!r}")
    return [b for b in sizes if b > 0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--batches", default="1,16,128", type=_sizes,
                    help="batch sizes on the GPU (comma-separated; 0 for none)")
    ap.add_argument("--numpy-batches", default="1", type=_sizes,
                    help="batch sizes on NumPy (comma-separated; 0 for none)")
    ap.add_argument("--servalcat", default=None, help="servalcat executable (CPU peer)")
    ap.add_argument("--cctbx", default=None, metavar="PYTHON",
                    help="a Python with cctbx-base: every row's CCmask by mmtbx map_model_cc too")
    ap.add_argument("--repeat", type=int, default=1, help="runs of every row, taking turns")
    ap.add_argument("--estimates", default=None, metavar="JSON",
                    help="bench/gpu_cost.py --json output: its H100 estimates beside the rows")
    ap.add_argument("--weights", default=None,
                    help="a weight grid (comma-separated): every start with every weight")
    args = ap.parse_args()
    data = Path(args.data)
    monlib = data / "monomers"
    model, map_data = load(data)
    print(f"# EMD-2566 / 3J6B chain 9 ({model.n_atoms} atoms, no H), 3.2 Å, sites + ADP, "
          f"shake 0.5 Å\n# hardware: {hardware()}")
    estimates = json.loads(Path(args.estimates).read_text()) if args.estimates else {}
    print("| program | batch | wall (s) | s per model | CCmask mean | CCmask min | "
          "bonds max (Å) | angles max (°) | cctbx CCmask mean | cctbx CCmask min | "
          "cost model's H100 estimate (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = [(name, b) for name, sizes in (("numpy", args.numpy_batches),
                                          ("cupy", args.batches)) for b in sizes
            if name in available_backends()]
    if args.servalcat:
        rows.append(("servalcat", 1))
    walls = {row: [] for row in rows}
    results, grids, phases, peer = {}, {}, {}, {}
    for _ in range(max(1, args.repeat)):
        for row in rows:
            name, n = row
            if name == "servalcat":
                wall, cc, bonds, angles, st = run_servalcat(args.servalcat, model, map_data,
                                                            monlib)
                results[row] = (np.array([cc]), bonds, angles)
                refined = [st]
            else:
                wall, stats, phases[row], refined = run_ours(model, map_data, monlib,
                                                             get_backend(name), n, args.weights)
                results[row] = (np.array([s["cc_mask_final"] for s in stats]),
                                max(s["rmsd_bonds"] for s in stats),
                                max(s["rmsd_angles"] for s in stats))
                grids[row] = [s for s in stats if s["start"] == 1]
            if args.cctbx:
                peer[row] = cctbx_cc_mask(args.cctbx, refined, map_data)
            walls[row].append(wall)
            print(f"# {name} batch {n}: {wall:.1f} s, CCmask {results[row][0].mean():.4f}",
                  file=sys.stderr, flush=True)
    for row in rows:
        name, n = row
        w = np.array(walls[row])
        cc, bonds, angles = results[row]
        label = ("servalcat refine_spa_norefmac" if name == "servalcat"
                 else f"gpu_refine {name}")
        members = n * (len(grids[row]) if row in grids else 1)
        spread = f" ({w.min():.1f}-{w.max():.1f})" if len(w) > 1 else ""
        by_cctbx = (f"{peer[row].mean():.4f} | {peer[row].min():.4f}" if row in peer
                    else "– | –")
        estimate = estimates.get(str(n)) if name == "cupy" else None
        print(f"| {label} | {members} | {np.median(w):.1f}{spread} | "
              f"{np.median(w) / members:.3f} | {cc.mean():.4f} | {cc.min():.4f} | {bonds:.4f} | "
              f"{angles:.2f} | {by_cctbx} | "
              f"{'–' if estimate is None else f'{estimate:.2f}'} |", flush=True)
    if phases:
        names = list(next(iter(phases.values())))
        print("\nWhere the time goes (seconds; the last run of each row):\n\n"
              "| program | batch | " + " | ".join(names) + " |\n|---|---:|"
              + "---:|" * len(names))
        for (name, n), p in phases.items():
            print(f"| gpu_refine {name} | {n} | "
                  + " | ".join(f"{p.get(k, 0.0):.2f}" for k in names) + " |")
    if args.weights:
        print("\n| program | weight | CCmask | bonds (Å) | angles (°) |\n"
              "|---|---:|---:|---:|---:|")
        for (name, n), stats in grids.items():
            for s in stats:
                print(f"| gpu_refine {name} (batch {n}) | {s['weight']:g} | "
                      f"{s['cc_mask_final']:.4f} | {s['rmsd_bonds']:.4f} | "
                      f"{s['rmsd_angles']:.2f} |")


if __name__ == "__main__":
    main()
