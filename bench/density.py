"""Model-map speed: gemmi's C++ DensityCalculatorE (one thread), the NumPy fallback and CuPy.

For N atoms (random protein-like C/N/O/S, B 20-60 Å², density 0.05 atoms/Å³), batch B and
resolution d (grid spacing d/3, gemmi's rate 1.5): time of the exact density ("map") and of map +
adjoint ("map+grad"), in ms per model and in atom×grid-point evaluations per second.

    python bench/density.py            # the full table (GPU rows where CuPy sees a device)
    python bench/density.py --quick    # small sizes, a minute on a laptop
    python bench/density.py --quick --cell hexagonal   # a periodic P 1 cell of that shape
    python bench/density.py --quick --cell orthorhombic --spacegroup "P 21 21 21"

``--cell box`` (default) is a cryo-EM-like box around the atoms; the others are periodic unit
cells of the same volume with a crystal's angles (monoclinic, hexagonal: the NumPy path
factorises each Gaussian into a line and a plane; triclinic: it cannot, and computes whole
boxes).  ``--aniso`` gives every atom an anisotropic U (whole boxes on every grid).
``--spacegroup`` makes the cell a crystal's, as many times larger as the group has operations,
sampled to suit the group: the maps hold the mates, summed over the group on the grid (and,
in rows "(mates as atoms)", by placing the mates' atoms again); gemmi's rows add its
symmetrize_sum.  atom×points/s counts the model's atoms, not the mates'.
"""
import argparse
import platform
import time

import gemmi
import numpy as np

import cpu_fallback

import gpu_refine as gr
from gpu_refine.backend import available_backends, get_backend
from gpu_refine.density import DensitySettings, ModelMapper, crystal_copies
from gpu_refine.grid import space_group_operations
from gpu_refine.scattering import form_factor_table


def random_model(n_atoms, seed=0, aniso=False):
    rng = np.random.default_rng(seed)
    edge = (n_atoms / 0.05) ** (1 / 3)
    st = gemmi.Structure()
    model = gemmi.Model("1")
    chain = gemmi.Chain("A")
    elements = rng.choice(["C", "C", "C", "N", "O", "S"], n_atoms)
    xyz = rng.random((n_atoms, 3)) * edge
    b = rng.uniform(20, 60, n_atoms)
    for start in range(0, n_atoms, 10):
        res = gemmi.Residue()
        res.name = "UNK"
        res.seqid = gemmi.SeqId(start // 10 + 1, " ")
        for i in range(start, min(n_atoms, start + 10)):
            a = gemmi.Atom()
            a.name = f"{elements[i]}{i - start}"
            a.element = gemmi.Element(elements[i])
            a.pos = gemmi.Position(*xyz[i])
            a.b_iso = b[i]
            if aniso:
                a.aniso = gemmi.SMat33f(*random_u(rng, b[i]))
            a.occ = 1.0
            res.add_atom(a)
        chain.add_residue(res)
    model.add_chain(chain)
    st.add_model(model)
    st.spacegroup_hm = "P 1"
    return st


def random_u(rng, b):
    """An anisotropic U (U11, U22, U33, U12, U13, U23) with B_eq = b: principal values 0.5-1.5
    times U_iso along random axes."""
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    w = rng.uniform(0.5, 1.5, 3)
    u = q @ np.diag(w * 3 / w.sum() * b / (8 * np.pi**2)) @ q.T
    return u[0, 0], u[1, 1], u[2, 2], u[0, 1], u[0, 2], u[1, 2]


def timed(fn, sync, repeat):
    fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


CELL_ANGLES = {"orthorhombic": (90.0, 90.0, 90.0), "monoclinic": (90.0, 105.0, 90.0),
               "hexagonal": (90.0, 90.0, 120.0), "triclinic": (80.0, 95.0, 105.0)}


def grid_for(model, d, cell, spacegroup="P 1"):
    """The GridSpec of the run (spacing about d/3) and the unit cell gemmi's grid gets."""
    box = gr.box_around(model.xyz, d / 3.0, 3.0)
    if cell == "box":
        return box, gemmi.UnitCell(*box.cell)
    uc = gemmi.UnitCell(1, 1, 1, *CELL_ANGLES[cell])
    volume = np.prod(box.cell[:3]) * len(space_group_operations(spacegroup))
    edge = (volume / uc.volume) ** (1 / 3)
    n = int(np.ceil(edge / (d / 3.0)))
    if spacegroup.replace(" ", "") != "P1":
        n = 12 * int(np.ceil(n / 12))          # a sampling that suits 2-, 3-, 4- and 6-folds
    spec = gr.GridSpec(cell=(edge, edge, edge) + CELL_ANGLES[cell], sampling=(n, n, n),
                       shape=(n, n, n), spacegroup=spacegroup)
    if spec.is_crystal and not (spec.unit_cell.is_compatible_with_spacegroup(
            gemmi.SpaceGroup(spacegroup)) and spec.grid_operations() is not None):
        raise SystemExit(f"{spacegroup} does not suit a {cell} cell with equal edges")
    return spec, spec.unit_cell


def pairs_per_model(model, spec, blur):
    names, stype = np.unique(model.element, return_inverse=True)
    coefs = form_factor_table(list(names), "electron")
    b = model.b[None].astype(np.float64)
    r = cpu_fallback.cutoff_radii(b, None, None, stype, coefs, blur, 1e-5, np.empty_like(b))[0]
    return float((4 / 3 * np.pi * r**3).sum() / abs(np.linalg.det(spec.xyz_from_index)))


def run(sizes, batches, resolutions, numpy_max_atoms, repeat, cell="box", spacegroup="P 1",
        aniso=False):
    rows = []
    backends = available_backends()
    for d in resolutions:
        for n in sizes:
            st = random_model(n, aniso=aniso)
            model = gr.Model.from_gemmi(st)
            spec, st.cell = grid_for(model, d, cell, spacegroup)
            st2 = st.clone()
            for cra in st2[0].all():
                cra.atom.pos = cra.atom.pos - gemmi.Position(*spec.origin_xyz)
            dc = gemmi.DensityCalculatorE()
            dc.grid.set_unit_cell(st.cell)
            dc.grid.spacegroup = gemmi.SpaceGroup(spacegroup)
            dc.grid.set_size(*spec.shape)
            settings = DensitySettings(table="electron")
            mapper0 = ModelMapper(spec, d, settings, backend="numpy")
            batch0 = gr.Batch.from_model(model, 1, backend="numpy")
            blur = mapper0.blur_for(batch0)
            dc.blur = blur
            npairs = pairs_per_model(model, spec, blur)

            def gem():
                dc.grid.fill(0.0)
                dc.add_model_density_to_grid(st2[0])
                if spec.is_crystal:
                    dc.grid.symmetrize_sum()

            t = timed(gem, lambda: None, repeat)
            rows.append(("gemmi C++ (1 thread)", n, 1, d, "map", t, npairs))
            for name in backends:
                bk = get_backend(name)
                sync = (lambda: bk.xp.cuda.Device().synchronize()) if bk.is_gpu else (lambda: None)
                mappers = [(name, ModelMapper(spec, d, settings, backend=bk))]
                if spec.is_crystal:
                    mappers.append((f"{name} (mates as atoms)",
                                    ModelMapper(spec, d, settings, backend=bk,
                                                copies=crystal_copies(spec))))
                for label, mapper in mappers:
                    for nb in batches:
                        if name == "numpy" and (nb > 1 or n > numpy_max_atoms):
                            continue
                        batch = gr.Batch.from_model(model, nb, backend=bk)
                        dmap = bk.xp.ones((nb,) + spec.shape, dtype=np.float32)
                        t_map = timed(lambda: mapper.exact(batch, blur), sync, repeat)
                        t_both = timed(lambda: (mapper.exact(batch, blur),
                                                mapper.exact_adjoint(batch, dmap, blur)),
                                       sync, repeat)
                        rows.append((label, n, nb, d, "map", t_map, npairs * nb))
                        rows.append((label, n, nb, d, "map+grad", t_both, 2 * npairs * nb))
                        bk.free_memory()
    return rows


def table(rows):
    lines = ["| backend | atoms | batch | d (Å) | work | ms per model | atom×points/s |",
             "|---|---:|---:|---:|---|---:|---:|"]
    for name, n, nb, d, work, t, pairs in rows:
        lines.append(f"| {name} | {n} | {nb} | {d} | {work} | {1e3 * t / nb:.3f} | {pairs / t:.3g} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cell", default="box", choices=["box"] + list(CELL_ANGLES))
    ap.add_argument("--aniso", action="store_true",
                    help="every atom anisotropic (ANISOU with B_eq = B)")
    ap.add_argument("--spacegroup", default="P 1",
                    help="a crystal's space group for a periodic --cell (default P 1)")
    args = ap.parse_args()
    if args.cell == "box" and args.spacegroup.replace(" ", "") != "P1":
        ap.error("--spacegroup needs a periodic --cell")
    if args.quick:
        sizes, batches, res, nmax = [1000, 5000], [1, 10], [3.0], 5000
    else:
        sizes, batches, res, nmax = [1000, 5000, 20000, 100000], [1, 10, 100], [3.0, 2.0], 20000
    bk = get_backend()
    print(f"hardware: {platform.processor() or platform.machine()}, {bk.device}; "
          f"gemmi {gemmi.__version__}, numpy {np.__version__}; grid: {args.cell}, "
          f"{args.spacegroup}; atoms: {'anisotropic' if args.aniso else 'isotropic'}")
    print(table(run(sizes, batches, res, nmax, args.repeat, args.cell, args.spacegroup,
                    args.aniso)))


if __name__ == "__main__":
    main()
