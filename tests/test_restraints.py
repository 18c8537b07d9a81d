"""Restraints from gemmi topologies: counts and values against gemmi's own Topo calculations,
deposited-model statistics, nonbonded pair lists, ADP restraints, regularisation, bad input."""
import io
import logging
import warnings

import gemmi
import numpy as np
import pytest
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from gpu_refine import examples
from gpu_refine.errors import InputError
from gpu_refine.model import Batch, Model, read_model
from gpu_refine.restraints.adp import ADPRestraints
from gpu_refine.restraints.geometry import GeometryRestraints
from gpu_refine.restraints.nonbonded import NonbondedSettings
from gpu_refine.restraints.stats import geometry_statistics
from gpu_refine.restraints.topology import build_topology, ccp4_hydrogen_names
from gpu_refine.workflows.geometry import geometry_report, regularize, shaken_batch
from helpers import disulfide_structure, self_linked_cysteine

MODELS = {"5e5z": "xray/5e5z/5e5z.pdb", "1l2h": "xray/1l2h/1l2h.cif.gz",
          "4hg7": "xray/4hg7/4hg7.cif", "4iid": "xray/4iid/4iid.pdb", "4xof": "xray/4xof/4xof.pdb",
          "3j6b": "cryoem/emd2566_3j6b_chain9/3J6B_9.pdb"}


def without_h(path):
    st = gemmi.read_structure(str(path))
    st.setup_entities()
    st.remove_hydrogens()
    return Model.from_gemmi(st)


def gemmi_topology(model, monlib):
    """gemmi's Topo and the structure and library it points into (which must outlive it).
    N-terminal H1 (phenix naming) are named H first, as build_topology does (4xof has them)."""
    st = model.structure.clone()
    ccp4_hydrogen_names(st)
    lib = gemmi.read_monomer_lib(str(monlib) + "/", st[0].get_all_residue_names())
    return gemmi.prepare_topology(st, lib, warnings=io.StringIO(),
                                  ignore_unknown_links=True), st, lib


@pytest.mark.parametrize("name", ["5e5z", "1l2h", "4hg7", "4xof", "3j6b"])
def test_values_and_counts_match_gemmi(shared, backend, name):
    monlib = shared / "monomers"
    model = read_model(shared / MODELS[name])
    topo = build_topology(model, monlib=monlib)
    ref, _st, _lib = gemmi_topology(model, monlib)
    assert topo.counts() == {"n_bonds": len(ref.bonds), "n_angles": len(ref.angles),
                             "n_torsions": len(ref.torsions), "n_chirals": len(ref.chirs),
                             "n_planes": len(ref.planes)}
    terms = GeometryRestraints(topo, backend=backend, dtype=np.float64).terms(model.xyz[None])
    got = {k: backend.to_numpy(d)[0] for k, (_, d) in terms.items()}
    bonds = np.array([b.calculate() - b.restr.value for b in ref.bonds])
    np.testing.assert_allclose(got["bonds"], bonds, atol=1e-9)
    angles = np.array([np.degrees(a.calculate()) - a.restr.value for a in ref.angles])
    np.testing.assert_allclose(np.degrees(got["angles"]), angles, atol=1e-7)
    ok = topo.torsions.sigma > 0
    tz = np.array([t.calculate_z() for t in ref.torsions])
    np.testing.assert_allclose(np.abs(np.degrees(got["torsions"]) / np.where(ok, topo.torsions.sigma, 1))[ok],
                               tz[ok], atol=1e-7)
    cz = np.array([c.calculate_z(ref.ideal_chiral_abs_volume(c), 0.2) for c in ref.chirs])
    np.testing.assert_allclose(np.abs(got["chirals"]) / 0.2, cz, atol=1e-8)
    dist = []
    for p in ref.planes:
        coeff = gemmi.find_best_plane(p.atoms)
        dist += [abs(gemmi.get_distance_from_plane(a.pos, coeff)) for a in p.atoms]
    np.testing.assert_allclose(np.abs(got["planes"]), dist, atol=1e-8)


def test_4iid_links_as_gemmi_finds_them(shared):
    topo = build_topology(read_model(shared / MODELS["4iid"]), monlib=shared / "monomers")
    assert topo.counts()["n_bonds"] == 14239
    assert {k: topo.links[k] for k in ("disulf", "pyr-ASN", "BETA1-4", "ALPHA1-3", "ALPHA1-6",
                                       "ALPHA1-2")} == {"disulf": 6, "pyr-ASN": 19, "BETA1-4": 26,
                                                        "ALPHA1-3": 11, "ALPHA1-6": 15,
                                                        "ALPHA1-2": 12}


def test_4iid_links_found_from_distances_without_records(shared):
    """The 89 links of 4iid's SSBOND and LINK records are found again from distances alone
    (find_links, the default), as phenix and Refmac find disulfides."""
    model = read_model(shared / MODELS["4iid"])
    with_records = build_topology(model, monlib=shared / "monomers")
    model.structure.connections.clear()
    found = build_topology(model, monlib=shared / "monomers")
    assert found.links == with_records.links and found.counts() == with_records.counts()
    assert ({tuple(sorted(b)) for b in found.bonds.atoms.tolist()}
            == {tuple(sorted(b)) for b in with_records.bonds.atoms.tolist()})
    bare = build_topology(model, monlib=shared / "monomers", find_links=False)
    assert "disulf" not in bare.links
    assert bare.counts()["n_bonds"] == with_records.counts()["n_bonds"] - 89


def _sg_pair_state(topology, xyz):
    """(SG-SG bonded?, SG-SG repelled?, CB-SG' repelled?) for disulfide_structure's model."""
    sg = [i for i, lab in enumerate(topology.labels) if lab.endswith("/SG")]
    cb = [i for i, lab in enumerate(topology.labels) if lab.endswith("/CB")]
    n = topology.n_atoms
    real = np.concatenate([np.arange(n), topology.mate_atom])     # an image's atom
    bonded = any(sorted(real[b]) == sg for b in topology.bonds.atoms)
    restraints = GeometryRestraints(topology, backend="numpy", dtype=np.float64)
    restraints.update_pairs(xyz[None], force=True)
    pl = restraints.pairs
    mate_atom = np.concatenate([pl.mate_atom, [0]]).astype(np.int64)
    partner = np.where(pl.pairs[:, 1] < n, pl.pairs[:, 1],
                       mate_atom[np.clip(pl.pairs[:, 1] - n, 0, len(pl.mate_atom))])
    pairs = {tuple(sorted(p)) for p in zip(pl.pairs[:, 0].tolist(), partner.tolist())}
    return bonded, tuple(sg) in pairs, tuple(sorted((cb[0], sg[1]))) in pairs


@pytest.mark.parametrize("across_cell", [False, True])
def test_disulfide_without_records(across_cell):
    """Two cysteines 2.03 Å apart with no SSBOND record: found from the distance they are
    bonded (not repelled, nor CB from the other SG); without find_links they repel.  Linked
    to a symmetry mate (B one cell edge away) the link is restrained on B's image, and the
    two SG and their neighbours do not repel each other's images."""
    model = Model.from_gemmi(disulfide_structure(across_cell))
    topo = build_topology(model)
    assert topo.links == {"SS": 1}
    assert _sg_pair_state(topo, model.xyz) == (True, False, False)
    _, (r,) = geometry_report(model)
    assert r["n_overlaps"] == 0 and r["rmsd_bonds"] < 0.05
    if across_cell:
        assert [sorted(p) for p in topo.symmetry_links.tolist()] == [[5, 11]]
        inside = build_topology(Model.from_gemmi(disulfide_structure(False)))
        assert topo.counts() == inside.counts() and topo.n_mates > 0
        # B is restrained across the link as within the cell (an image's B is its atom's).
        assert (ADPRestraints(topo).pairs.tolist() == ADPRestraints(inside).pairs.tolist()
                and [5, 11] in ADPRestraints(topo).pairs.tolist())
    bare = build_topology(model, find_links=False)
    assert not bare.links and not len(bare.symmetry_links) and bare.n_mates == 0
    assert _sg_pair_state(bare, model.xyz) == (False, True, True)


def test_a_link_to_a_symmetry_mate_is_restrained_on_its_image(backend, rng):
    """The disulfide to B's lattice translate has the energy of the same disulfide within the
    cell (the two models differ by that translation of B), and its gradient, B's image's
    part returned to B's atoms, matches finite differences."""
    across = Model.from_gemmi(disulfide_structure(True))
    inside = Model.from_gemmi(disulfide_structure(False))
    n = across.n_atoms
    move = rng.normal(scale=0.1, size=(2, n, 3))
    shift = np.where(np.arange(n)[:, None] >= n // 2, [40.0, 0.0, 0.0], 0.0)
    assert np.allclose(across.xyz - inside.xyz, shift)
    results = []
    for model, offset in ((inside, 0.0), (across, shift)):
        restraints = GeometryRestraints(build_topology(model), backend=backend, dtype=np.float64,
                                        nonbonded=NonbondedSettings(enabled=False))
        xyz = backend.asarray(inside.xyz + offset + move)
        energy, grad = restraints.energy_and_gradient(xyz)
        results.append((backend.to_numpy(energy), backend.to_numpy(grad), restraints, xyz))
    assert results[0][0][0] > 1.0
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-9)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-7, atol=1e-9)
    _, grad, restraints, xyz = results[1]
    _check_gradient(restraints, backend.to_numpy(xyz), grad, (5, 11, 4, 10), backend)


def _check_gradient(restraints, x0, grad, atoms, backend, model=-1, h=1e-6):
    """Restraint gradient of ``atoms`` of one model vs central differences."""
    def energy(x):
        return backend.to_numpy(restraints.energy_and_gradient(backend.asarray(x))[0])[model]
    for atom in atoms:
        for c in range(3):
            plus, minus = x0.copy(), x0.copy()
            plus[model, atom, c] += h
            minus[model, atom, c] -= h
            fd = (energy(plus) - energy(minus)) / (2 * h)
            assert grad[model, atom, c] == pytest.approx(fd, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("record", [True, False])
def test_a_residue_linked_to_its_own_image(backend, rng, record):
    """A cysteine linked to its own image across a 2-fold (P 1 2 1), by an SSBOND record or
    found from the distance (gemmi's search passes over a residue's own image): the link is
    restrained on the image, with the deviations of the two-chain model the residue was cut
    from (B is the image), and its gradient matches finite differences."""
    st = self_linked_cysteine()
    if not record:
        st.connections.clear()
    model = Model.from_gemmi(st)
    topo = build_topology(model)
    assert topo.links == {"SS": 1} and topo.symmetry_links.tolist() == [[5, 5]]
    if not record:
        assert not build_topology(model, find_links=False).links
    assert sorted(topo.mate_atom.tolist()) == [4, 5]        # the image's SG and CB
    pair = build_topology(Model.from_gemmi(disulfide_structure()))
    deltas = []
    link_bonds = (np.nonzero((topo.bonds.atoms >= model.n_atoms).any(axis=1))[0],
                  np.nonzero((np.sort(pair.bonds.atoms, axis=1) == [5, 11]).all(axis=1))[0])
    for t, m, link_bond in ((topo, model, link_bonds[0]),
                            (pair, Model.from_gemmi(disulfide_structure()), link_bonds[1])):
        assert len(link_bond) == 1
        terms = GeometryRestraints(t, backend=backend, dtype=np.float64).terms(m.xyz[None])
        deltas.append((backend.to_numpy(terms["bonds"][1])[0, link_bond],
                       backend.to_numpy(terms["torsions"][1])[0]))
    np.testing.assert_allclose(deltas[0][0], deltas[1][0], atol=1e-9)
    # The torsion sits at 180° against 90° with period 2: its deviation is ±π/2, the sign a
    # matter of rounding, so compare the size that the energy sees.
    np.testing.assert_allclose(np.abs(deltas[0][1]), np.abs(deltas[1][1]), atol=1e-9)
    _, (r,) = geometry_report(model)
    assert r["rmsd_bonds"] < 0.05 and r["n_overlaps"] == 0
    restraints = GeometryRestraints(topo, backend=backend, dtype=np.float64)
    x0 = model.xyz[None] + rng.normal(scale=0.1, size=(1,) + model.xyz.shape)
    grad = backend.to_numpy(restraints.energy_and_gradient(backend.asarray(x0))[1])
    _check_gradient(restraints, x0, grad, (4, 5), backend)


def test_a_link_record_the_library_does_not_define(caplog):
    """A LINK record between atoms that no library link joins (here A/CYS SG - B/CYS CB) is
    restrained as a bond of the two covalent radii, with a warning, and its atoms do not
    repel each other (it was dropped, and they were pushed apart)."""
    st = disulfide_structure()
    conn = gemmi.Connection()
    conn.name, conn.type, conn.asu = "link1", gemmi.ConnectionType.Covale, gemmi.Asu.Same
    conn.partner1 = gemmi.make_address(st[0]["A"], st[0]["A"][0], st[0]["A"][0]["SG"][0])
    conn.partner2 = gemmi.make_address(st[0]["B"], st[0]["B"][0], st[0]["B"][0]["CB"][0])
    st.connections.append(conn)
    model = Model.from_gemmi(st)
    with caplog.at_level("WARNING", logger="gpu_refine"):
        topo = build_topology(model, find_links=False)
    assert "1 link record(s) that the library does not define" in caplog.text
    sg, cb = model.structure[0]["A"][0]["SG"][0], model.structure[0]["B"][0]["CB"][0]
    i, j = (topo.labels.tolist().index(f"{c}/CYS 2/{a.name}") for c, a in (("A", sg), ("B", cb)))
    k = [sorted(b) for b in topo.bonds.atoms.tolist()].index(sorted([i, j]))
    radii = gemmi.Element("S").covalent_r + gemmi.Element("C").covalent_r
    assert topo.bonds.ideal[k] == pytest.approx(radii, abs=1e-6)
    restraints = GeometryRestraints(topo, backend="numpy", dtype=np.float64)
    restraints.update_pairs(model.xyz[None], force=True)
    assert sorted([i, j]) not in [sorted(p) for p in restraints.pairs.pairs.tolist()]


def test_a_metal_link_record_is_left_to_nonbonded_distances(caplog):
    """A zinc 2.3 Å from SG with a metalc record: covalent radii (2.27 Å here, 1.93 Å for
    Zn-N) miss coordination distances, so the record is not made a bond; the ion's small
    nonbonded radius keeps the contact free (no repulsion at 2.3 Å)."""
    st = disulfide_structure()
    del st[0]["B"]
    sg, cb = st[0]["A"][0]["SG"][0], st[0]["A"][0]["CB"][0]
    ion = gemmi.Residue()
    ion.name, ion.seqid, ion.het_flag = "ZN", gemmi.SeqId(101, " "), "H"
    zn = gemmi.Atom()
    zn.name, zn.element, zn.occ, zn.b_iso = "ZN", gemmi.Element("Zn"), 1.0, 30.0
    zn.pos = sg.pos + (sg.pos - cb.pos) * (2.3 / sg.pos.dist(cb.pos))     # away from CB
    ion.add_atom(zn)
    chain = gemmi.Chain("C")
    chain.add_residue(ion)
    st[0].add_chain(chain)
    st.setup_entities()
    conn = gemmi.Connection()
    conn.name, conn.type, conn.asu = "metal1", gemmi.ConnectionType.MetalC, gemmi.Asu.Same
    conn.partner1 = gemmi.make_address(st[0]["A"], st[0]["A"][0], st[0]["A"][0]["SG"][0])
    conn.partner2 = gemmi.make_address(st[0]["C"], st[0]["C"][0], st[0]["C"][0][0])
    st.connections.append(conn)
    model = Model.from_gemmi(st)
    with caplog.at_level("INFO", logger="gpu_refine"):
        topo = build_topology(model, find_links=False)
    assert "1 metal link record(s) without library values are not restrained" in caplog.text
    assert "that the library does not define" not in caplog.text
    n_zn = topo.labels.tolist().index("C/ZN 101/ZN")
    assert not (topo.bonds.atoms == n_zn).any()
    _, (r,) = geometry_report(model, find_links=False)
    assert r["n_overlaps"] == 0


@pytest.mark.parametrize("name", ["5e5z", "4hg7", "4iid", "4xof", "3j6b"])
def test_deposited_models_have_deposited_geometry(shared, name):
    # 3J6B's riding hydrogens sit 0.04 Å rms off any X-H ideal; its heavy atoms are judged.
    model = without_h(shared / MODELS[name]) if name == "3j6b" else read_model(
        shared / MODELS[name])
    _, (r,) = geometry_report(model, monlib=shared / "monomers", backend="numpy")
    assert 0.004 < r["rmsd_bonds"] < 0.025
    assert 0.4 < r["rmsd_angles"] < 2.5
    assert r["rmsd_planes"] < 0.02
    assert r["n_overlaps"] <= 0.02 * model.n_atoms   # 4xof: partial waters 1.9-2.2 Å apart


def test_polymers_linked_by_sequence_after_a_shake(shared):
    model = without_h(shared / MODELS["3j6b"])
    ref = build_topology(model, monlib=shared / "monomers")
    rng = np.random.default_rng(0)
    shift = rng.normal(size=model.xyz.shape)
    shaken = model.structure.clone()
    for k, cra in enumerate(shaken[0].all()):
        cra.atom.pos = gemmi.Position(*(model.xyz[k] + 0.5 * shift[k] / np.sqrt(3)))
    topo = build_topology(Model.from_gemmi(shaken), monlib=shared / "monomers")
    assert topo.counts() == ref.counts()
    # gemmi decides cis / trans from the (shaken) omega angle, so only the total is compared;
    # with every peptide trans the links are the deposited model's.
    assert sum(topo.links.values()) == sum(ref.links.values())
    np.testing.assert_array_equal(topo.bonds.atoms, ref.bonds.atoms)
    trans = build_topology(Model.from_gemmi(shaken), monlib=shared / "monomers",
                           apply_all_trans=True)
    assert trans.links == ref.links


def test_cis_peptides_are_pointed_out_or_made_trans(caplog):
    """A peptide of the helix turned to omega 30° is linked cis, as gemmi links one within 60°
    of cis, with a warning that names it (none where the file's records list it);
    apply_all_trans restrains it trans: the topology is then the untouched helix's, and the
    model's coordinates are left as they are."""
    st = examples.helix_structure()
    ref = build_topology(Model.from_gemmi(st))
    residues = list(st[0][0])
    c, n = (np.array(residues[i][name][0].pos.tolist()) for i, name in ((4, "C"), (5, "N")))
    omega = gemmi.calculate_omega(residues[4], residues[5])
    turn = Rotation.from_rotvec((np.radians(30) - omega) * (n - c) / np.linalg.norm(n - c))
    for res in residues[5:]:
        for atom in res:
            atom.pos = gemmi.Position(*turn.apply(np.array(atom.pos.tolist()) - c) + c)
    assert np.degrees(gemmi.calculate_omega(residues[4], residues[5])) == pytest.approx(30)
    model = Model.from_gemmi(st)
    xyz = model.xyz.copy()
    with caplog.at_level(logging.WARNING, logger="gpu_refine"):
        cis = build_topology(model)
    assert cis.links["CIS"] == 1
    assert "1 non-proline cis peptide(s)" in caplog.text and "A/ALA 5-LYS 6" in caplog.text
    record = gemmi.CisPep()
    record.partner_c, record.partner_n = (gemmi.AtomAddress("A", r.seqid, r.name, "")
                                          for r in residues[4:6])
    listed = st.clone()
    listed.cispeps = [record]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gpu_refine"):
        assert build_topology(Model.from_gemmi(listed)).links["CIS"] == 1
    assert "non-proline" not in caplog.text
    assert "1 cis peptide(s) (before a proline, or in the file's records)" in caplog.text
    with caplog.at_level(logging.INFO, logger="gpu_refine"):
        assert "CIS" not in build_topology(Model.from_gemmi(listed), apply_all_trans=True).links
    assert "the file's 1 cis-peptide record(s) are overridden" in caplog.text
    trans = build_topology(model, apply_all_trans=True)
    assert trans.links == ref.links
    for kind in ("bonds", "angles", "torsions", "chirals", "planes"):
        a, b = getattr(trans, kind), getattr(ref, kind)
        np.testing.assert_array_equal(a.atoms, b.atoms)
        np.testing.assert_allclose(a.sigma, b.sigma)
        if a.ideal is not None:
            np.testing.assert_allclose(a.ideal, b.ideal)
    np.testing.assert_array_equal(model.xyz, xyz)


def test_pair_list_is_the_union_over_the_batch(shared, backend):
    model = without_h(shared / MODELS["3j6b"])
    topo = build_topology(model, monlib=shared / "monomers")
    restraints = GeometryRestraints(topo, backend=backend, dtype=np.float64)
    batch = shaken_batch(model, 4, 0.4, seed=3, backend=backend, dtype=np.float64)
    restraints.update_pairs(batch.xyz, force=True)
    listed = {tuple(p) for p in restraints.pairs.pairs.tolist()}
    bonded = {tuple(sorted(p)) for p in topo.bonds.atoms.tolist()}
    xyz = backend.to_numpy(batch.xyz)
    for m in range(len(xyz)):
        close = cKDTree(xyz[m]).query_pairs(2.2, output_type="ndarray")   # below every dmin
        for i, j in close.tolist():
            if (i, j) not in bonded and not any(i in a and j in a for a in topo.angles.atoms):
                assert (i, j) in listed
    # Small moves keep the list; a move beyond half the margin rebuilds it.
    assert not restraints.update_pairs(batch.xyz + 0.1)
    moved = batch.xyz.copy()
    moved[0, 0, 0] += restraints.pairs.allowed_move + 0.01
    assert restraints.update_pairs(moved)


def test_adp_restraints_gradients(backend, rng):
    model = read_model_from_helix()
    topo = build_topology(model)
    aniso = rng.random(model.n_atoms) < 0.5
    adp = ADPRestraints(topo, backend=backend, dtype=np.float64, is_aniso=aniso)
    b = rng.uniform(10, 50, (2, model.n_atoms))
    a = rng.normal(size=(2, model.n_atoms, 3, 3)) * 0.2
    mat = a @ np.swapaxes(a, -1, -2) + 0.1 * np.eye(3)
    u = np.stack([mat[..., 0, 0], mat[..., 1, 1], mat[..., 2, 2], mat[..., 0, 1],
                  mat[..., 0, 2], mat[..., 1, 2]], axis=-1)
    for values, fn in ((b, adp.b_energy_and_gradient), (u, adp.u_energy_and_gradient)):
        f, g = (backend.to_numpy(v) for v in fn(backend.asarray(values)))
        assert (f > 0).all()
        for idx in [tuple(rng.integers(0, s) for s in values.shape) for _ in range(12)]:
            h = 1e-5
            plus, minus = values.copy(), values.copy()
            plus[idx] += h
            minus[idx] -= h
            fd = (backend.to_numpy(fn(backend.asarray(plus))[0])[idx[0]] -
                  backend.to_numpy(fn(backend.asarray(minus))[0])[idx[0]]) / (2 * h)
            assert g[idx] == pytest.approx(fd, rel=1e-5, abs=1e-6)


def read_model_from_helix():
    from gpu_refine.examples import helix_structure
    st = helix_structure()
    st.setup_entities()
    return Model.from_gemmi(st)


def test_statistics_of_a_batch(backend):
    """The same numbers on every backend (reduced there, per model); outliers worst first, at
    most ``max_outliers`` listed, counted against |delta / sigma| > 4 from the raw terms."""
    model = read_model_from_helix()
    topo = build_topology(model)
    batch = shaken_batch(model, 3, 0.3, seed=2, backend="numpy", dtype=np.float64)
    ref_restraints = GeometryRestraints(topo, backend="numpy", dtype=np.float64)
    ref = geometry_statistics(ref_restraints, batch.xyz, max_outliers=5)
    restraints = GeometryRestraints(topo, backend=backend, dtype=np.float64)
    got = geometry_statistics(restraints, backend.asarray(batch.xyz), max_outliers=5)
    assert len(got) == 3
    for r, g in zip(ref, got):
        assert r.keys() == g.keys()
        for key, value in r.items():
            if isinstance(value, float):
                assert g[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
        assert [o["atoms"] for o in g["outliers"]] == [o["atoms"] for o in r["outliers"]]
        assert g["worst_overlap"]["atoms"] == r["worst_overlap"]["atoms"]
    terms = ref_restraints.terms(batch.xyz)
    for m, r in enumerate(ref):
        n = 0
        for name in ("bonds", "angles", "torsions", "chirals", "planes"):
            delta = terms[name][1][m]
            delta = np.degrees(delta) if name in ("angles", "torsions") else delta
            sigma = getattr(topo, name).sigma
            n += int((np.abs(delta[sigma > 0] / sigma[sigma > 0]) > 4.0).sum())
        assert r["n_outliers"] == n > 5
        z = [abs(o["z"]) for o in r["outliers"]]
        assert len(z) == 5 and z == sorted(z, reverse=True) and min(z) > 4.0
        for o in r["outliers"]:
            assert o["z"] == pytest.approx(o["delta"] / o["sigma"])


@pytest.mark.large
def test_regularisation_of_a_shaken_batch(shared, backend):
    model = without_h(shared / MODELS["3j6b"])
    topo = build_topology(model, monlib=shared / "monomers")
    restraints = GeometryRestraints(topo, backend=backend, dtype=np.float32)
    n = 32 if backend.is_gpu else 4      # a batch, at the cost a CPU can spare
    batch = shaken_batch(model, n, 0.3, seed=1, backend=backend)
    before = geometry_statistics(restraints, batch.xyz)
    assert min(r["rmsd_bonds"] for r in before) > 0.1
    regularize(batch, restraints)
    after = geometry_statistics(restraints, batch.xyz)
    assert len(after) == n
    for r in after:
        assert r["rmsd_bonds"] < 0.01 and r["rmsd_angles"] < 1.5
        assert r["rmsd_planes"] < 0.01 and r["rmsd_chirals"] < 0.2


def test_unknown_residue_and_bad_library(shared, tmp_path):
    model = read_model_from_helix()
    st = model.structure.clone()
    st[0][0][2].name = "XYZ"
    odd = Model.from_gemmi(st)
    with pytest.raises(InputError, match=r"XYZ.*dictionary=FILE.cif.*ignore_unknown"):
        build_topology(odd)
    topo = build_topology(odd, ignore_unknown=True)
    assert len(topo.unrestrained) == len(st[0][0][2])
    assert not np.isin(topo.bonds.atoms, topo.unrestrained).any()
    with pytest.raises(InputError, match="not found"):
        build_topology(model, monlib=tmp_path / "nowhere")
    with pytest.raises(InputError, match="not a monomer library"):
        build_topology(model, monlib=tmp_path)


def test_duplicated_atoms_are_an_error():
    """Two atoms of one name and altloc in a residue: gemmi would restrain one and the other
    would be pushed off it; the model is refused with the atoms named.  Altlocs make them
    two conformers."""
    st = read_model_from_helix().structure.clone()
    res = st[0][0][2]
    res.add_atom(res[1])
    with pytest.raises(InputError, match=r"duplicated atoms.*A/ALA 3/CA;"):
        build_topology(Model.from_gemmi(st))
    res[1].altloc, res[len(res) - 1].altloc, res[1].occ, res[len(res) - 1].occ = "A", "B", .5, .5
    assert build_topology(Model.from_gemmi(st)).n_atoms == len(list(st[0].all()))


def test_atoms_on_each_other(caplog):
    """A bonded pair at one place has no direction for its restraints (the gradient is not a
    number; a refinement froze the model): regularisation refuses it with the atoms named and
    the geometry report warns; two conformers at one place are fine."""
    st = read_model_from_helix().structure.clone()
    res = st[0][0][5]
    res["CB"][0].pos = res["CA"][0].pos
    model = Model.from_gemmi(st)
    batch = Batch.from_model(model, 2, backend="numpy", dtype=np.float64)
    with pytest.raises(InputError, match="model 1: atoms A/LYS 6/CA and A/LYS 6/CB lie on "
                                         "each other: restraints cannot tell"):
        regularize(batch)
    caplog.set_level(logging.WARNING, logger="gpu_refine")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = geometry_report(model)[1][0]
    assert "A/LYS 6/CA and A/LYS 6/CB lie on each other" in caplog.text
    assert report["n_outliers"] > 0
    res["CA"][0].altloc, res["CB"][0].altloc = "A", "B"
    assert build_topology(Model.from_gemmi(st)).coincident(model.xyz[None]) == []


@pytest.mark.parametrize("library", ["builtin", "ccp4"])
def test_phenix_style_n_terminal_hydrogens(library, request):
    """reduce/phenix name the three H of a free N-terminus H1, H2, H3, the CCP4 library H, H2,
    H3: H1 is restrained as H, and keeps its name."""
    monlib = None if library == "builtin" else str(request.getfixturevalue("shared") / "monomers")
    st = read_model_from_helix().structure.clone()
    first = st[0][0][0]
    n = first.find_atom("N", "*").clone()   # add_atom may move the residue's atoms
    for name, d in (("H1", (0.9, 0.3, 0.2)), ("H2", (-0.3, 0.9, 0.2)), ("H3", (-0.3, -0.4, 0.9))):
        h = n.clone()
        h.name, h.element, h.pos = name, gemmi.Element("H"), n.pos + gemmi.Position(*d)
        first.add_atom(h)
    model = Model.from_gemmi(st)
    topo = build_topology(model, monlib=monlib)
    assert len(topo.unrestrained) == 0
    bonded = {topo.labels[j].rsplit("/", 1)[1] for i, j in topo.bonds.atoms
              if topo.labels[i] == topo.labels[0].rsplit("/", 1)[0] + "/N"}
    assert {"H1", "H2", "H3"} <= bonded
    assert [a.name for a in model.structure[0][0][0]][-3:] == ["H1", "H2", "H3"]


def _brute_force_mate_energy(model, topo, restraints):
    """1/2 sum over every atom and every image of every atom (all operations, lattice shifts
    -2..2) closer than its minimum distance, but the atom itself and its special-position
    images: the lattice energy per asymmetric unit, found without the pair list."""
    pl = restraints.pairs
    st = model.structure
    cell = st.cell
    orth, frac = np.array(cell.orth.mat.tolist()), np.array(cell.frac.mat.tolist())
    x = model.xyz.astype(np.float64)
    tree = cKDTree(x)
    w = 1.0 / restraints.nonbonded_settings.sigma ** 2
    energy = 0.0
    shifts = np.array(np.meshgrid(*[range(-2, 3)] * 3, indexing="ij")).reshape(3, -1).T
    for op in st.find_spacegroup().operations():
        rot = np.array(op.rot, dtype=np.float64) / op.DEN
        tran = np.array(op.tran, dtype=np.float64) / op.DEN
        identity = np.allclose(rot, np.eye(3)) and not tran.any()
        for shift in shifts:
            if identity and not shift.any():
                continue
            image = (x @ frac.T @ rot.T + tran + shift) @ orth.T
            if np.any(image.min(0) > x.max(0) + 4.0) or np.any(image.max(0) < x.min(0) - 4.0):
                continue
            hits = tree.sparse_distance_matrix(cKDTree(image), 4.0, output_type="ndarray")
            i, j, d = hits["i"], hits["j"], hits["v"]
            keep = pl._allowed(i, j) & ~((i == j) & (d < pl.settings.special_position))
            i, j, d = i[keep], j[keep], d[keep]
            dmin = pl.min_distance(i, j, mates=True)
            energy += 0.5 * w * (np.clip(dmin - d, 0, None) ** 2).sum()
    return energy


def test_symmetry_mates_repel_in_a_crystal(shared, backend):
    """4hg7 (P 65 2 2, a hexagonal cell): the nonbonded energy with mates minus that without is
    the lattice energy per asymmetric unit found by brute force, its gradient matches finite
    differences, and a cryo-EM model (no crystal cell) has no mates."""
    st = gemmi.read_structure(str(shared / MODELS["4hg7"]))
    st.remove_hydrogens()
    st.setup_entities()
    c = st.cell   # a cell 4 % smaller brings the mates into contact
    st.cell = gemmi.UnitCell(0.96 * c.a, 0.96 * c.b, 0.96 * c.c, c.alpha, c.beta, c.gamma)
    model = Model.from_gemmi(st)
    topo = build_topology(model, monlib=shared / "monomers")
    assert topo.spacegroup == "P 65 2 2"
    rng = np.random.default_rng(7)
    xyz = (model.xyz + rng.normal(scale=0.1, size=model.xyz.shape))[None]
    moved = Model.from_gemmi(model.to_gemmi(xyz[0], model.b, model.occ))
    plain = GeometryRestraints(topo, backend=backend, dtype=np.float64,
                               nonbonded=NonbondedSettings(symmetry=False))
    full = GeometryRestraints(topo, backend=backend, dtype=np.float64)

    def nonbonded(restraints):
        energy, delta = restraints.terms(xyz)["nonbonded"]
        return float(backend.to_numpy(energy)[0]), backend.to_numpy(delta)[0]

    def total(x):
        return float(backend.to_numpy(full.energy_and_gradient(x)[0])[0])

    e_plain, e_full = nonbonded(plain)[0], nonbonded(full)[0]
    assert full.pairs.n_mates > 0 and plain.pairs.n_mates == 0
    expected = _brute_force_mate_energy(moved, topo, full)
    assert expected > 0
    assert e_full - e_plain == pytest.approx(expected, rel=1e-9)
    grad = backend.to_numpy(full.energy_and_gradient(xyz)[1])
    # Atoms in violated contacts with mates, on either side.
    pl = full.pairs
    violated = (nonbonded(full)[1] < 0) & (pl.pairs[:, 1] >= model.n_atoms)
    pairs = pl.pairs[violated]
    atoms = np.unique(np.concatenate([pairs[:3, 0], pl.mate_atom[pairs[:3, 1] - model.n_atoms]]))
    assert len(atoms) >= 3
    h = 1e-5
    for a in atoms:
        for c in range(3):
            plus, minus = xyz.copy(), xyz.copy()
            plus[0, a, c] += h
            minus[0, a, c] -= h
            fd = (total(plus) - total(minus)) / (2 * h)
            assert grad[0, a, c] == pytest.approx(fd, rel=1e-5, abs=1e-6)
    em = build_topology(without_h(shared / MODELS["3j6b"]), monlib=shared / "monomers")
    assert em.cell is None and GeometryRestraints(em).pairs.crystal is None


@pytest.mark.parametrize("edge,crystal", [(8.0, False), (60.0, True)])
def test_a_cell_smaller_than_the_model_is_not_a_crystal(caplog, edge, crystal):
    """A map's box written as CRYST1 (P 1) smaller than the model puts lattice translates on
    top of it: taken as no crystal (no mates to repel, no links to them), with a warning; a
    cell that holds the model keeps its mates."""
    st = examples.helix_structure("AEAKAEAKAEAKAEAK")     # ~18 Å across
    st.cell = gemmi.UnitCell(edge, edge, edge, 90, 90, 90)
    st.spacegroup_hm = "P 1"
    model = Model.from_gemmi(st)
    topo = build_topology(model)
    assert (topo.cell is not None) == crystal
    assert len(topo.symmetry_links) == 0
    assert ("not a crystal's packing" in caplog.text) != crystal
    restraints = GeometryRestraints(topo)
    restraints.update_pairs(model.xyz[None], force=True)
    assert (restraints.pairs.crystal is not None) == crystal
    assert restraints.pairs.n_mates == 0


@pytest.mark.parametrize("occ,repelled", [(1.0, True), (0.6, True), (0.5, False)])
def test_half_occupied_atoms_ignore_their_images(backend, occ, repelled):
    """A water 0.8 Å off a 2-fold axis meets its image 1.6 Å away: repelled when fully
    occupied, or when the two occupancies sum to more than 1; not when the site is disorder
    across the axis (occupancy 1/2)."""
    st = gemmi.Structure()
    st.cell = gemmi.UnitCell(20, 20, 20, 90, 90, 90)
    st.spacegroup_hm = "P 1 2 1"
    st.add_model(gemmi.Model("1"))
    st[0].add_chain(gemmi.Chain("A"))
    res = gemmi.Residue()
    res.name, res.seqid = "HOH", gemmi.SeqId(1, " ")
    atom = gemmi.Atom()
    atom.name, atom.element, atom.pos, atom.occ, atom.b_iso = (
        "O", gemmi.Element("O"), gemmi.Position(0.8, 5, 0), occ, 20.0)
    res.add_atom(atom)
    st[0][0].add_residue(res)
    st.setup_entities()
    model = Model.from_gemmi(st)
    restraints = GeometryRestraints(build_topology(model), backend=backend, dtype=np.float64)
    energy, delta = restraints.terms(model.xyz[None])["nonbonded"]
    assert (restraints.pairs.n_mates > 0) == repelled
    if repelled:
        assert backend.to_numpy(delta).min() == pytest.approx(1.6 - 2.6, abs=1e-9)
        assert float(backend.to_numpy(energy)[0]) > 0


def test_restraints_gpu_matches_numpy(shared, gpu):
    """The whole restraint set (every type, the nonbonded pair list) of a shaken batch through
    the CUDA kernels equals the NumPy twins: energies, gradients and per-restraint deltas."""
    model = read_model(shared / MODELS["3j6b"])
    topo = build_topology(model)
    batch = shaken_batch(model, 2, 0.3, seed=3, backend="numpy", dtype=np.float64)
    xyz = batch.xyz
    results = []
    for bk in ("numpy", gpu):
        restraints = GeometryRestraints(topo, backend=bk, dtype=np.float64)
        f, g = restraints.energy_and_gradient(restraints.backend.asarray(xyz))
        terms = restraints.terms(restraints.backend.asarray(xyz))
        to_np = restraints.backend.to_numpy
        results.append((to_np(f), to_np(g), {k: to_np(d) for k, (_, d) in terms.items()}))
    (f0, g0, d0), (f1, g1, d1) = results
    np.testing.assert_allclose(f1, f0, rtol=1e-10)
    np.testing.assert_allclose(g1, g0, rtol=1e-9, atol=1e-9 * np.abs(g0).max())
    assert set(d1) == set(d0) and "nonbonded" in d0
    for kind in d0:
        np.testing.assert_allclose(d1[kind], d0[kind], rtol=1e-9, atol=1e-12, err_msg=kind)
