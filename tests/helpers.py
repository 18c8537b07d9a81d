"""Inputs for tests: random atoms and grids for kernel tests (fresh every run), crystal maps,
a disulfide without records; the command line run as a user runs it."""
import contextlib
import io
import os
import subprocess
import sys

import gemmi
import numpy as np

import gpu_refine as gr
from gpu_refine.cli.main import run
from gpu_refine.density import DensitySettings, ModelMapper
from gpu_refine.examples import helix_structure, place_atom
from gpu_refine.grid import GridSpec
from gpu_refine.scattering import form_factor_table


def random_atoms(rng, n_models, n_atoms, spec, aniso=False, dtype=np.float64, margin=3.0):
    """Atoms inside ``spec``'s box (away from a non-periodic edge by ``margin`` Å)."""
    lo = spec.origin_xyz + margin
    box = spec.xyz_from_index @ (np.asarray(spec.shape) - 1) - 2 * margin
    xyz = lo + rng.random((n_models, n_atoms, 3)) * box
    b = rng.uniform(10, 60, (n_models, n_atoms))
    occ = rng.uniform(0.3, 1.0, (n_models, n_atoms))
    elements = ["C", "N", "O", "S", "H"]
    stype = rng.integers(0, len(elements), n_atoms).astype(np.int32)
    coefs = form_factor_table(elements, "electron")
    u = flag = None
    if aniso:
        flag = rng.random(n_atoms) < 0.5
        # Both kinds always: tests pick an isotropic and an anisotropic atom (with 12 atoms
        # all of one kind came up once in CI).
        flag[:2] = (False, True)
        a = rng.normal(size=(n_models, n_atoms, 3, 3)) * 0.15
        m = a @ np.swapaxes(a, -1, -2) + 0.08 * np.eye(3)
        u = np.stack([m[..., 0, 0], m[..., 1, 1], m[..., 2, 2], m[..., 0, 1], m[..., 0, 2],
                      m[..., 1, 2]], axis=-1)
        u = u.astype(dtype)
    return (xyz.astype(dtype), b.astype(dtype), u, flag, occ.astype(dtype), stype, coefs)


def triclinic_spec(periodic=True):
    shape = (20, 24, 22)
    sampling = shape if periodic else (40, 48, 44)
    return GridSpec(cell=(14.0, 16.0, 15.0, 80.0, 95.0, 105.0), sampling=sampling, shape=shape,
                    start=(0, 0, 0) if periodic else (5, 6, 7), origin=(1.0, -2.0, 0.5))


def triclinic_slab_spec():
    """A box of a triclinic cell that holds whole periods along a and c only: it wraps there."""
    return GridSpec(cell=(14.0, 16.0, 15.0, 80.0, 95.0, 105.0), sampling=(20, 48, 22),
                    shape=(20, 24, 22), start=(0, 6, 0), origin=(1.0, -2.0, 0.5),
                    wrap=(True, False, True))


def monoclinic_spec(periodic=True):
    """Index axis 1 (b) perpendicular to the others."""
    shape = (20, 24, 22)
    return GridSpec(cell=(14.0, 16.0, 15.0, 90.0, 104.0, 90.0), sampling=shape, shape=shape,
                    start=(0, 0, 0), origin=(0.0, 0.0, 0.0))


def hexagonal_box_spec():
    """A box of a hexagonal cell: index axis 2 (c) perpendicular to a and b (120°)."""
    return GridSpec(cell=(20.0, 20.0, 16.0, 90.0, 90.0, 120.0), sampling=(36, 36, 30),
                    shape=(24, 26, 22), start=(3, 2, 4), origin=(-5.0, 10.0, 2.0))


def ortho_box_spec():
    return GridSpec(cell=(18.0, 20.0, 16.0, 90, 90, 90), sampling=(30, 32, 28),
                    shape=(30, 32, 28), origin=(100.0, 50.0, -20.0))


def crystal_map(model, cell, spacegroup, spacing=1.0):
    """The model's map at 3 Å (its symmetry mates included) on the whole cell of a crystal."""
    sampling = tuple(int(np.ceil(c / spacing)) for c in cell[:3])
    spec = GridSpec(cell=cell, sampling=sampling, shape=sampling, spacegroup=spacegroup)
    mapper = ModelMapper(spec, 3.0, DensitySettings(), backend="numpy")
    data = mapper.image(gr.Batch.from_model(model, 1, backend="numpy"))[0]
    return gr.MapData(np.asarray(data, dtype=np.float32), spec)


def write_mtz(path, map_data, d_min, columns=(("FWT", "F"), ("PHWT", "P"))):
    """The map's structure factors to d_min as an MTZ with an amplitude and a phase column."""
    spec = map_data.spec
    grid = gemmi.FloatGrid(np.asfortranarray(map_data.data), gemmi.UnitCell(*spec.cell),
                           gemmi.SpaceGroup(spec.spacegroup))
    asu = gemmi.transform_map_to_f_phi(grid, half_l=True).prepare_asu_data(dmin=d_min)
    mtz = gemmi.Mtz(with_base=True)
    mtz.spacegroup = gemmi.SpaceGroup(spec.spacegroup)
    mtz.set_cell_for_all(gemmi.UnitCell(*spec.cell))
    mtz.add_dataset("simulated")
    for label, kind in columns:
        mtz.add_column(label, kind)
    values = asu.value_array
    mtz.set_data(np.column_stack([asu.miller_array, np.abs(values),
                                  np.degrees(np.angle(values))]).astype(np.float32))
    mtz.write_to_file(str(path))


def add_side_chain_atom(res, name, element, bond, angle, chi=-60.0):
    """Add atom ``name`` to ``res`` bonded to its CB (|CB-X| ``bond`` Å, angle CA-CB-X
    ``angle``°, torsion N-CA-CB-X ``chi``°); returns its position."""
    n, ca, cb = (np.array(res[x][0].pos.tolist()) for x in ("N", "CA", "CB"))
    x = place_atom(n, ca, cb, bond, angle, chi)
    atom = gemmi.Atom()
    atom.name, atom.element, atom.pos, atom.occ, atom.b_iso = (
        name, gemmi.Element(element), gemmi.Position(*x), 1.0, 30.0)
    res.add_atom(atom)
    return x


def disulfide_structure(across_cell=False):
    """Two cysteines (chains A, B) whose SG are 2.03 Å apart (CB-SG-SG' 104°), with no SSBOND
    record; B is A turned by 180° about an axis through the bond's midpoint.  With
    ``across_cell`` the model is in a P 1 cell (40 Å) and B one cell edge away: A links to
    B's lattice translate, a symmetry mate."""
    st = helix_structure("AAA")
    chain = st[0][0]
    del chain[2]
    del chain[0]
    res = chain[0]
    res.name = "CYS"
    pos = {a.name: np.array(a.pos.tolist()) for a in res}
    sg = add_side_chain_atom(res, "SG", "S", 1.81, 114.0)
    u = (sg - pos["CB"]) / np.linalg.norm(sg - pos["CB"])
    q = np.cross(u, pos["CA"] - pos["CB"])
    q /= np.linalg.norm(q)
    w = np.cos(np.radians(76.0)) * u + np.sin(np.radians(76.0)) * q    # SG -> SG'
    axis = np.cross(w, u)
    axis /= np.linalg.norm(axis)
    centre = sg + 1.015 * w
    shift = np.array([40.0, 0.0, 0.0]) if across_cell else np.zeros(3)
    mate = chain.clone()
    mate.name = "B"
    for a in mate[0]:
        d = np.array(a.pos.tolist()) - centre
        a.pos = gemmi.Position(*(centre + 2 * (d @ axis) * axis - d + shift))
    st[0].add_chain(mate)
    if across_cell:
        st.cell = gemmi.UnitCell(40, 40, 40, 90, 90, 90)
        st.spacegroup_hm = "P 1"
    st.setup_entities()
    return st


def self_linked_cysteine():
    """One cysteine whose SG lies 2.03 Å from its image across the 2-fold of a P 1 2 1 cell
    (disulfide_structure's B is that image), with an SSBOND record to it: a residue linked to
    its own symmetry mate."""
    st = disulfide_structure()
    a, b = (np.array([x.pos.tolist() for x in st[0][c][0]]) for c in "AB")
    # B = R A + t, R a 2-fold: its axis u and a point c on it; turn the frame so that the
    # axis runs along y through the origin, where P 1 2 1 has its 2-fold.
    ca, cb = a.mean(0), b.mean(0)
    v, _, wt = np.linalg.svd((a - ca).T @ (b - cb))
    rot = wt.T @ np.diag([1, 1, np.linalg.det(wt.T @ v.T)]) @ v.T
    t = cb - rot @ ca
    w, vecs = np.linalg.eig(rot)
    u = np.real(vecs[:, np.argmin(np.abs(w - 1))])
    c = np.linalg.lstsq(np.eye(3) - rot, t, rcond=None)[0]
    y = u / np.linalg.norm(u)
    x = np.cross(y, [0.0, 0.0, 1.0] if abs(y[2]) < 0.9 else [1.0, 0.0, 0.0])
    x /= np.linalg.norm(x)
    frame = np.array([x, y, np.cross(x, y)])
    del st[0]["B"]
    for atom in st[0]["A"][0]:
        atom.pos = gemmi.Position(*(frame @ (np.array(atom.pos.tolist()) - c)))
    st.cell = gemmi.UnitCell(30, 30, 30, 90, 90, 90)
    st.spacegroup_hm = "P 1 2 1"
    con = gemmi.Connection()
    con.name, con.type, con.asu = "disulf1", gemmi.ConnectionType.Disulf, gemmi.Asu.Different
    con.partner1 = con.partner2 = gemmi.make_address(st[0]["A"], st[0]["A"][0],
                                                     st[0]["A"][0]["SG"][0])
    st.connections.append(con)
    st.setup_entities()
    return st


def cli(*args, cwd=None, child=False, env=None):
    """(exit code, stdout, stderr) of ``gpu-refine ARGS``: run in this process through the
    CLI's own ``run`` (as the entry point calls it), or with ``child`` (or ``env``) as a
    real process."""
    argv = [str(a) for a in args]
    if child or env is not None:
        p = subprocess.run([sys.executable, "-m", "gpu_refine", *argv], cwd=cwd,
                           capture_output=True, text=True, timeout=600,
                           env=None if env is None else {**os.environ, **env})
        return p.returncode, p.stdout, p.stderr
    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    try:
        os.chdir(cwd or here)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = run(argv)
    finally:
        os.chdir(here)
    return rc, out.getvalue(), err.getvalue()


def one_line_error(rc, err, code=1):
    """A failed command as the README promises: exit ``code``, one line on stderr."""
    assert rc == code, (rc, err)
    assert err.count("\n") == 1 and err.startswith("gpu-refine: error:"), err
    assert "Traceback" not in err
