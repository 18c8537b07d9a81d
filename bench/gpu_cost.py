"""GPU cost of a real-space refinement, measured without a GPU: counts on the CuPy stand-in.

The engine's CuPy path runs on the stand-in (tests/cupy_standin.py, its raw kernels built for
the host by tests/host_cuda.py), which counts what a GPU would be asked to do: device→host
syncs, uploads, launches (raw kernels, elementwise and reduction calls, FFTs) with the bytes
each reads and writes, and the density kernels' atom × grid-point pairs.  For the benchmark
case (EMD-2566 / 3J6B chain 9 without H, 3.2 Å, starts shaken 0.5 Å, as bench/rsr.py) at each
batch size it counts one target evaluation of the sites and one L-BFGS iteration of the sites
and of the B (runs of 4 and 2 iterations after a first run, differenced), takes the number of iterations of a
whole run from a NumPy run of the same case (one model; a batch runs as long as its slowest
model, about as long as one; the weight search's trials run side by side, as on a GPU), and
prints per evaluation, per iteration and per run with an estimated H100 time:

    bytes / HBM + launches × LAUNCH + syncs × SYNC + pairs / PAIR_RATE

    python bench/gpu_cost.py [--data ../shared/data] [--batches 1,16,128] [--quick]
                             [--json FILE]

``--quick``: the example helix (120 atoms) instead, batches 1 and 2 (tests/test_bench.py).
The full run takes ~40 min on 2 cores: the host-built kernels do batch 128's work on a CPU.
``--json FILE``: the estimates per batch also into FILE, for bench/rsr.py ``--estimates`` to
print beside the times a GPU measures (bench/device.sh).
"""
import argparse
import json
import platform
import sys
import time
from pathlib import Path

import gemmi
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import cupy_standin  # noqa: E402
import host_cuda  # noqa: E402

import gpu_refine as gr  # noqa: E402
import gpu_refine.examples  # noqa: E402,F401
from gpu_refine.backend import Backend, get_backend  # noqa: E402
from gpu_refine.workflows.geometry import shaken_batch  # noqa: E402
from gpu_refine.workflows.rsr import RSRSettings, RealSpaceRefinement  # noqa: E402

# The cost model's constants, all in one place (H100 SXM, CuPy 14):
HBM = 2.0e12           # bytes/s: what streaming kernels reach of HBM3's 3.35 TB/s peak
LAUNCH = 8e-6          # s per launch: CuPy's Python-side cost of a kernel or ufunc call
SYNC = 30e-6           # s per device→host sync: stream drain, copy, Python
PAIR_RATE = 2e10       # atom × grid-point pairs/s of the current density kernels (issue 29's
                       # reading of bench/RESULTS.md's H200 timings, first section)

EMD = Path("cryoem") / "emd2566_3j6b_chain9"
COLUMNS = ("syncs", "uploads", "launches", "bytes", "pairs")


def standin_backend():
    return Backend("cupy", host_cuda.standin_cupy(), host_cuda.host_kernels(),
                   "CuPy stand-in on the host CPU (tests/cupy_standin.py)")


def case(data, quick):
    """(model, map, resolution) of the benchmark case, or of the example with ``quick``."""
    if quick:
        model = gr.Model.from_gemmi(gr.examples.helix_structure())
        grid, spec = gr.examples.simulated_map(model, 3.0, backend="numpy")
        return model, gr.MapData(grid, spec), 3.0
    st = gemmi.read_structure(str(data / EMD / "3J6B_9.pdb"))
    st.remove_hydrogens()
    st.setup_entities()
    return gr.Model.from_gemmi(st), gr.read_map(data / EMD / "2566_3J6B_9.mrc"), 3.2


def seconds(c):
    """Estimated H100 seconds of counts ``c``."""
    return (c["bytes"] / HBM + c["launches"] * LAUNCH + c["syncs"] * SYNC
            + c["pairs"] / PAIR_RATE)


def counted(fn):
    """(counts of calling fn, its result)."""
    cost = cupy_standin.cost
    cost.reset()
    out = fn()
    return cost.snapshot(), out


def floor_bytes(job, b):
    """Bytes one sites evaluation must move at batch b: each model's grid (the box, in the
    grids' precision) written by the density, read and written by the forward and the
    inverse transform (half-size complex terms), read by the CC sums, written as the gradient
    map and read by the adjoint; twice over the transforms (image and gradient); plus the
    map and the masks read once per model."""
    target = job.cc_target
    n = int(np.prod(target.spec.shape))
    real = np.dtype(target.settings.dtype).itemsize
    per_model = n * real * (1 + 2 * 2 * 2 + 1 + 1 + 1) + n * 4 + n * 8
    return b * per_model


def minus(a, b, scale=1.0):
    return {k: (a[k] - b[k]) * scale for k in COLUMNS}


def numpy_iterations(model, map_data, d):
    """({phase: L-BFGS iterations} of a whole default run of one start on NumPy, seconds).
    Phases: "regularize" (restraints alone), "sites" (coarse stages, macro-cycles), "weight"
    (the weight search's trials), "adp"; "trials" (how many) and "rebuilds" (of the
    nonbonded pair list)."""
    job = RealSpaceRefinement(model, map_data, RSRSettings(resolution=d),
                              backend=get_backend("numpy"),
                              starts=shaken_batch(model, 1, 0.5, seed=0, backend="numpy"))
    its = {"regularize": 0, "sites": 0, "weight": 0, "adp": 0, "trials": 0, "rebuilds": 0}
    phase = ["sites"]
    search = job.search_weight

    def searching(*args, **kwargs):
        phase[0] = "weight"
        try:
            choice = search(*args, **kwargs)
        finally:
            phase[0] = "sites"
        its["trials"] = len(choice.trials)
        return choice
    job.search_weight = searching
    for name in ("regularize", "refine_sites", "refine_adp"):
        method = getattr(job, name)

        def wrapped(*args, _m=method, _name=name, **kwargs):
            res = _m(*args, **kwargs)
            if res is not None:
                key = {"regularize": "regularize", "refine_adp": "adp"}.get(_name, phase[0])
                its[key] += int(np.max(res.iterations))
            return res
        setattr(job, name, wrapped)
    t0 = time.perf_counter()
    job.run()
    its["rebuilds"] = job.restraints.pairs.n_builds
    return its, time.perf_counter() - t0


def settle(job, batch, weight):
    """A copy of ``batch`` 20 sites iterations in: where per_iteration starts, so that its
    short runs move atoms too little to rebuild the pair list."""
    settled = batch.subset(list(range(batch.size)))
    job.refine_sites(settled, weight, 20)
    return settled


def per_iteration(job, settled, phase, weight):
    """Counts of one L-BFGS iteration of ``phase`` (sites, regularize or adp) at a settled
    batch (``settle``): runs of 4 and of 2 iterations, differenced (what a call costs once,
    its set-up and first evaluation, cancels).  Both start with the pair list built there,
    so that neither rebuilds it: rebuilds are counted per run instead (``rebuilds``)."""

    def run(n):
        copy = settled.subset(list(range(settled.size)))
        job.restraints.update_pairs(copy.xyz, force=True)
        if phase == "sites":
            return job.refine_sites(copy, weight, n)
        if phase == "regularize":
            return job.regularize(copy, n)
        return job.refine_adp(copy, n)
    run(2)                                  # caches of this batch size
    c4, r4 = counted(lambda: run(4))
    c2, r2 = counted(lambda: run(2))
    its = max(int(np.max(r4.iterations) - np.max(r2.iterations)), 1)
    out = minus(c4, c2, 1.0 / its)
    out["evaluations"] = (r4.n_evaluations - r2.n_evaluations) / its
    return out


def rebuilds(ev, n):
    """Counts of n pair-list rebuilds in a run: each repeats one sites evaluation (the stale
    one) after a sync, and uploads the new list (3 arrays)."""
    out = {k: ev[k] * n for k in COLUMNS}
    out["syncs"] += n
    out["uploads"] += 3 * n
    return out


def row(name, c):
    if "evaluations" in c:
        name += f" ({c['evaluations']:.1f} evaluations)"
    return (f"| {name} | {c['syncs']:.0f} | {c['uploads']:.0f} | {c['launches']:.0f} | "
            f"{c['bytes'] / 1e9:.3f} | {c['pairs'] / 1e9:.3f} | {seconds(c) * 1e3:.1f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(HERE.parents[1] / "shared" / "data"))
    ap.add_argument("--batches", default=None)
    ap.add_argument("--quick", action="store_true", help="the example helix, batches 1 and 2")
    ap.add_argument("--json", default=None, help="write the estimates per batch to this file")
    args = ap.parse_args()
    if host_cuda.compiler() is None:
        sys.exit("gpu_cost: no C++20 compiler to build the CUDA sources for the host")
    batches = [int(b) for b in (args.batches or ("1,2" if args.quick else "1,16,128"))
               .split(",")]
    model, map_data, d = case(Path(args.data), args.quick)
    its, took = numpy_iterations(model, map_data, d)
    print(f"# {'example helix' if args.quick else 'EMD-2566 / 3J6B chain 9'} ({model.n_atoms} "
          f"atoms, {d} Å); {platform.machine()}; counted on the CuPy stand-in")
    settings = RSRSettings()
    n_trials = settings.weight_trials
    per_trial = its["weight"] / max(its["trials"], 1)
    print(f"# NumPy run of 1 start ({took:.1f} s): {its['regularize']} regularisation, "
          f"{its['sites']} sites, {its['adp']} ADP iterations; weight search {its['trials']} "
          f"trials, {per_trial:.0f} iterations each")
    print(f"# run of B starts = regularisation x {its['regularize']} + sites x {its['sites']} "
          f"(+ {settings.sites_iterations} where B > 1: macro-cycle 1 of the starts the search "
          f"did not refine) + ADP x {its['adp']} + weight search x {2 * per_trial:.0f} (its "
          f"{n_trials} trials side by side, as on a GPU) + {its['rebuilds']} pair-list rebuilds "
          f"(each a repeated evaluation)")
    print(f"# H100 model: bytes / {HBM / 1e12:.1f} TB/s + launches x {LAUNCH * 1e6:.0f} us + "
          f"syncs x {SYNC * 1e6:.0f} us + pairs / {PAIR_RATE:.0e}/s")
    bk = standin_backend()
    estimate, trial_costs = {}, {}
    for b in batches:
        starts = shaken_batch(model, b, 0.5, seed=0, backend=bk)
        job = RealSpaceRefinement(model, map_data, RSRSettings(resolution=d), backend=bk,
                                  starts=starts)
        batch = job.copy_batch()
        weight = np.full(b, 100.0)
        fg = job._sites_objective(batch, weight)
        # As a sites minimisation holds them: B fixed, the pair list checked by the minimiser.
        with job.sites_target.fixed_b(batch), job.restraints.deferred_pair_checks():
            fg(batch.xyz.reshape(b, -1))          # caches filled, as in a run
            ev = counted(lambda: fg(batch.xyz.reshape(b, -1)))[0]
        floor = floor_bytes(job, b)
        settled = settle(job, batch, weight)
        regularize = per_iteration(job, settled, "regularize", weight)
        sites = per_iteration(job, settled, "sites", weight)
        adp = per_iteration(job, settled, "adp", weight)
        # On a GPU the weight search refines its trials side by side from model 1: one batch
        # of weight_trials, twice as long as a trial (the round and the halfway trial).
        if "trials" not in trial_costs:
            w = np.full(n_trials, 100.0)
            trial_costs["trials"] = per_iteration(
                job, settle(job, job.copy_batch().subset([0] * n_trials), w), "sites", w)
        trials = trial_costs["trials"]
        n_sites = its["sites"] + (settings.sites_iterations if b > 1 else 0)
        extra = rebuilds(ev, its["rebuilds"])
        run = {k: regularize[k] * its["regularize"] + sites[k] * n_sites
               + adp[k] * its["adp"] + trials[k] * 2 * per_trial + extra[k] for k in COLUMNS}
        estimate[b] = seconds(run)
        print(f"\n## batch {b}\n")
        print("| per | syncs | uploads | launches | GB | G pairs | H100 ms |")
        print("|---|---|---|---|---|---|---|")
        print(row("sites evaluation", ev))
        print(row("regularisation iteration", regularize))
        print(row("sites iteration", sites))
        print(row("ADP iteration", adp))
        print(row(f"weight-search iteration ({n_trials} trials)", trials))
        print(row("run", run))
        print(row("run, per model", {k: v / b for k, v in run.items()}))
        print(f"\nsites evaluation: {ev['bytes'] / floor:.1f}x the floor of {floor / 1e9:.3f} GB "
              f"(the grids an evaluation must read and write once); per sites iteration "
              f"{sites['syncs']:.0f} syncs, {sites['launches']:.0f} launches")
    if args.json:
        Path(args.json).write_text(json.dumps({str(b): estimate[b] for b in batches}))
    for b in batches:
        print(f"H100 estimate, {b} models: {estimate[b]:.2f} s")


if __name__ == "__main__":
    main()
