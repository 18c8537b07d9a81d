"""The built-in dictionary against the CCP4 monomer library subset in ../shared/data/monomers:
every shared bond within 0.02 Å, angle within 2°, same chiral signs, planes found there too.
Compared as applied to models (linked residues), since the two libraries describe the chain
links differently (ours: the in-chain phosphodiester; CCP4: a free phosphate changed by a mod)."""
import gemmi
import numpy as np
import pytest

from gpu_refine.examples import helix_structure
from gpu_refine.model import Model
from gpu_refine.restraints.library import BUILTIN
from gpu_refine.restraints.topology import build_topology
from gpu_refine.restraints.geometry import GeometryRestraints
from gpu_refine.restraints.stats import geometry_statistics
from gpu_refine.workflows.geometry import geometry_report, regularize, shaken_batch
from helpers import add_side_chain_atom

AMINO_ACIDS = ["ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "GLY", "HIS", "ILE", "LEU",
               "LYS", "MET", "MSE", "PHE", "PRO", "SER", "THR", "TRP", "TYR", "VAL"]
SINGLE_ATOMS = ["HOH", "NA", "CL", "MG", "ZN", "CA"]


@pytest.fixture(scope="module")
def libraries(shared):
    names = AMINO_ACIDS + SINGLE_ATOMS
    return (gemmi.read_monomer_lib(str(BUILTIN) + "/", names),
            gemmi.read_monomer_lib(str(shared / "monomers") + "/", names))


NUCLEOTIDE_PAIRS = [("A", "C"), ("G", "U"), ("DA", "DC"), ("DG", "DT"), ("C", "A"),
                    ("U", "G"), ("DC", "DA"), ("DT", "DG")]


def _nucleotide(shared, name, hydrogens=False):
    """One nucleotide at the CCP4 library's ideal coordinates (without H unless asked)."""
    doc = gemmi.cif.read(str(shared / "monomers" / name[0].lower() / f"{name}.cif"))
    st = gemmi.make_structure_from_chemcomp_block(doc[f"comp_{name}"])
    if not hydrogens:
        st.remove_hydrogens()
    return st[0][0][0]


def _dinucleotides(shared, hydrogens=False):
    """A chain of the NUCLEOTIDE_PAIRS, each second residue moved rigidly so that its P lies
    1.6 Å from O3' of the first and without its OP3 (and the first without HO3'), as inside a
    strand; chain k 40 Å from chain k-1 (each starts from the library's coordinates)."""
    st = gemmi.Structure()
    st.add_model(gemmi.Model("1"))
    for k, (n1, n2) in enumerate(NUCLEOTIDE_PAIRS):
        chain = gemmi.Chain(chr(ord("A") + k))
        r1, r2 = _nucleotide(shared, n1, hydrogens), _nucleotide(shared, n2, hydrogens)
        if hydrogens:
            del r1[[a.name for a in r1].index("HO3'")]
        o3, c3 = r1["O3'"][0].pos, r1["C3'"][0].pos
        target = o3 + (o3 - c3) * (1.6 / o3.dist(c3))
        shift = target - r2["P"][0].pos
        for atom in r2:
            atom.pos = atom.pos + shift
        del r2[[a.name for a in r2].index("OP3")]
        apart = gemmi.Position(40.0 * k, 0, 0)
        for atom in (*r1, *r2):
            atom.pos = atom.pos + apart
        r1.seqid, r2.seqid = gemmi.SeqId(1, " "), gemmi.SeqId(2, " ")
        chain.add_residue(r1)
        chain.add_residue(r2)
        st[0].add_chain(chain)
    st.setup_entities()
    return Model.from_gemmi(st)


def _applied(model, lib):
    """{type: {atom index tuple: ideal}} and chirals / planes of the topology with ``lib``."""
    topo = build_topology(model, monlib=lib)
    return topo, _applied_terms(topo)


def _applied_terms(topo):
    tables = {}
    for kind in ("bonds", "angles"):
        t = getattr(topo, kind)
        keys = [tuple(a) if a[0] < a[-1] else tuple(a[::-1]) for a in t.atoms.tolist()]
        tables[kind] = dict(zip(keys, t.ideal))
    c = topo.chirals
    tables["chirals"] = {tuple(a): (s, v) for a, s, v in zip(c.atoms.tolist(), c.sign, c.ideal)}
    p = topo.planes
    tables["planes"] = [frozenset(p.atoms[p.ptr[k]:p.ptr[k + 1]].tolist())
                        for k in range(len(p))]
    return tables


def _protein(shared, path):
    st = gemmi.read_structure(str(shared / path))
    st.setup_entities()
    st.remove_hydrogens()
    st.remove_ligands_and_waters()
    return Model.from_gemmi(st)


@pytest.fixture(scope="module")
def applied(shared):
    """Restraints as applied to a real protein (4iid: every amino acid, cis and trans links)
    with each library."""
    model = _protein(shared, "xray/4iid/4iid.pdb")
    return model, _applied(model, None)[1], _applied(model, shared / "monomers")[1]


# Where Engh & Huber's values and the (acedrg-derived) CCP4 entries differ by more than the
# tolerance; measured, listed here so that any other difference fails.
KNOWN_DIFFERENCES = {("LYS", "CE-NZ"), ("ASP", "C-CA-CB"), ("ASP", "CA-CB-CG"),
                     ("PRO", "CA-CB-CG"), ("THR", "CA-CB-OG1")}


def _terminal_residues(model, topo):
    """Residues at a chain end or gap: the built-in dictionary has no terminal variants."""
    names = np.array([c.atom.name for c in model.structure[0].all()])
    res = model.residue_index
    linked = set()
    for i, j in topo.bonds.atoms.tolist():
        if res[i] != res[j]:
            linked.add((res[i], names[i]))
            linked.add((res[j], names[j]))
    ends = set()
    for k in range(len(model.residues)):
        if (k, "N") not in linked or (k, "C") not in linked:
            ends.add(k)
    return ends


def test_bonds_and_angles_match_ccp4(applied, shared):
    model, ours, ccp4 = applied
    topo = build_topology(model, monlib=shared / "monomers")
    ends = _terminal_residues(model, topo)
    names = [c.atom.name for c in model.structure[0].all()]
    for kind, tol in (("bonds", 0.02), ("angles", 2.0)):
        common = set(ours[kind]) & set(ccp4[kind])
        assert len(common) >= 0.95 * len(ours[kind])
        bad = set()
        for key in common:
            if abs(ours[kind][key] - ccp4[kind][key]) <= tol:
                continue
            if any(model.residue_index[a] in ends for a in key):
                continue
            resname = model.residues[model.residue_index[key[1]]][2]
            bad.add((resname, "-".join(names[a] for a in key)))
        assert bad <= KNOWN_DIFFERENCES, f"{kind} beyond {tol}: {sorted(bad - KNOWN_DIFFERENCES)}"


def test_bond_sigmas_are_capped(applied):
    """Engh & Huber's 0.069 Å (ILE CG1-CD1) and 0.056 Å (MET SD-CE) are written as 0.030 Å:
    a 3 Å map compressed ILE 191 of EMD-2566 to 1.41 Å with the first."""
    model = applied[0]
    topo = build_topology(model)
    names = [c.atom.name for c in model.structure[0].all()]
    pairs = {frozenset(names[a] for a in key) for key in topo.bonds.atoms}
    assert {frozenset(("CG1", "CD1")), frozenset(("SD", "CE"))} <= pairs
    assert topo.bonds.sigma.max() <= 0.030 + 1e-9


def _name(names, key):
    """"A-B-C" with the smaller end name first, whatever the atom order."""
    parts = [names[a] for a in key]
    return "-".join(parts if parts[0] <= parts[-1] else parts[::-1])


# Parkinson et al. (1996) against the CCP4 (acedrg) values beyond the tolerance; measured.
# The link angles O3'-P-O5' (104.0 vs 100.7) and O3'-P-OP1 (107.4 vs 109.5), and
# P-O5'-C5' (120.9 vs 118.8).
KNOWN_NUCLEOTIDE_DIFFERENCES = {"O3'-P-O5'", "O3'-P-OP1", "C5'-O5'-P"}


def test_nucleotides_match_ccp4(shared):
    """Every nucleotide, linked: restraints on the in-chain residue and on the sugar and base of
    the 5' residue (whose free 5' phosphate the two libraries describe differently)."""
    model = _dinucleotides(shared)
    topo, ours = _applied(model, None)
    ccp4_topo, ccp4 = _applied(model, shared / "monomers")
    assert topo.links["p"] == ccp4_topo.links["p"] == len(NUCLEOTIDE_PAIRS)
    names = [c.atom.name for c in model.structure[0].all()]
    first = {k for k, r in enumerate(model.residues) if r[1] == "1"}
    five_prime = {i for i, n in enumerate(names)
                  if model.residue_index[i] in first and n in ("P", "OP1", "OP2", "OP3")}
    for kind, tol in (("bonds", 0.02), ("angles", 2.0)):
        compared = {k for k in ours[kind] if not five_prime & set(k)}
        assert compared <= set(ccp4[kind]), f"{kind} missing in CCP4: {compared - set(ccp4[kind])}"
        bad = {_name(names, key) for key in compared
               if abs(ours[kind][key] - ccp4[kind][key]) > tol}
        assert bad <= KNOWN_NUCLEOTIDE_DIFFERENCES, f"{kind} beyond {tol}: {sorted(bad)}"
        assert len(compared) > 0.9 * len(ccp4[kind])
    _same_hands_and_planes(names, ours, ccp4)


def _parity(order_a, order_b):
    """+1 if ``order_a`` is an even permutation of ``order_b``, else -1."""
    perm = [order_b.index(x) for x in order_a]
    inversions = sum(perm[i] > perm[j] for i in range(3) for j in range(i + 1, 3))
    return 1 if inversions % 2 == 0 else -1


def _same_hands_and_planes(names, ours, ccp4):
    by_centre = {atoms[0]: (list(atoms[1:]), sign) for atoms, (sign, _) in ccp4["chirals"].items()}
    assert ours["chirals"]
    for atoms, (sign, _) in ours["chirals"].items():
        assert atoms[0] in by_centre
        others, ccp4_sign = by_centre[atoms[0]]
        assert sorted(others) == sorted(atoms[1:])
        # CCP4 marks VAL CB and LEU CG "both"; otherwise the same hand in either atom order.
        assert ccp4_sign == 0 or sign == ccp4_sign * _parity(list(atoms[1:]), others)
    # Each of our planes is covered by CCP4 planes (CCP4 splits some, e.g. TRP, in two).
    for plane in ours["planes"]:
        cover = set().union(*[p for p in ccp4["planes"] if len(p & plane) >= 3])
        extra = {names[a] for a in plane - cover}
        # ARG CD: NE is sp2, so we keep CD in the guanidinium plane; CCP4 leaves it out.
        assert not extra or extra == {"CD"} and len(plane) == 5


def test_unknown_amino_acid_matches_ccp4(shared):
    """UNK (automated building's residue of unknown type) inside a chain: its bonds and angles
    within 0.02 Å and 2° of the CCP4 library's UNK, the same hand at CA."""
    st = helix_structure("AAA")
    res = st[0][0][1]
    res.name = "UNK"
    add_side_chain_atom(res, "CG", "C", 1.509, 114.1)
    st.setup_entities()
    model = Model.from_gemmi(st)
    _, ours = _applied(model, None)
    _, ccp4 = _applied(model, shared / "monomers")
    unk = set(np.flatnonzero(model.residue_index == 1).tolist())
    for kind, tol in (("bonds", 0.02), ("angles", 2.0)):
        keys = {k for k in ours[kind] if set(k) <= unk}
        assert len(keys) == {"bonds": 5, "angles": 5}[kind] and keys <= set(ccp4[kind])
        assert all(abs(ours[kind][k] - ccp4[kind][k]) <= tol for k in keys), kind
    names = [c.atom.name for c in model.structure[0].all()]
    _same_hands_and_planes(names, ours, ccp4)


def test_chirality_and_planes_match_ccp4(applied):
    model, ours, ccp4 = applied
    _same_hands_and_planes([c.atom.name for c in model.structure[0].all()], ours, ccp4)


def test_single_atom_monomers_present(libraries):
    ours = libraries[0]
    for name in SINGLE_ATOMS:
        atoms = ours.monomers[name].atoms
        assert sum(not a.is_hydrogen() for a in atoms) == 1
    assert sorted(a.id for a in ours.monomers["HOH"].atoms) == ["H1", "H2", "O"]


MODELS = {"4hg7": "xray/4hg7/4hg7.cif", "4iid": "xray/4iid/4iid.pdb",
          "3j6b": "cryoem/emd2566_3j6b_chain9/3J6B_9.pdb"}


# Measured exceptions to the 20 %: 3J6B chain 9 was refined with Engh & Huber targets
# and sits closer to ours (bonds 0.0071 vs 0.0092 Å with the CCP4 library; the largest
# contributions are SER CA-CB, LYS CD-CE / CE-NZ and N-CA, where the two sets differ by
# 0.006-0.02 Å).
TOLERANCE = {("3j6b", "rmsd_bonds"): 0.25}


@pytest.mark.parametrize("name", list(MODELS))
def test_statistics_close_to_ccp4_library(shared, name):
    model = _protein(shared, MODELS[name])
    _, (ours,) = geometry_report(model, backend="numpy")
    _, (ccp4,) = geometry_report(model, monlib=shared / "monomers", backend="numpy")
    for key in ("n_bonds", "n_angles", "n_chirals"):
        assert abs(ours[key] - ccp4[key]) <= 0.01 * ccp4[key] + 1, key
    for key in ("rmsd_bonds", "rmsd_angles", "rmsd_planes"):
        assert ours[key] == pytest.approx(ccp4[key], rel=TOLERANCE.get((name, key), 0.20)), key


def test_nucleotide_chains_regularise_with_builtin_dictionary(shared):
    """The built-in nucleotide restraints are consistent: shaken strands come back to ideal."""
    model = _dinucleotides(shared)
    topology = build_topology(model)
    assert topology.links["p"] == len(NUCLEOTIDE_PAIRS)
    restraints = GeometryRestraints(topology, backend="numpy", dtype=np.float64)
    batch = shaken_batch(model, 4, 0.3, seed=2, backend="numpy", dtype=np.float64)
    assert min(r["rmsd_bonds"] for r in geometry_statistics(restraints, batch.xyz)) > 0.1
    regularize(batch, restraints)
    for r in geometry_statistics(restraints, batch.xyz):
        assert r["rmsd_bonds"] < 0.01 and r["rmsd_angles"] < 1.5
        assert r["rmsd_planes"] < 0.01 and r["rmsd_chirals"] < 0.2


# Hydrogens.  Distances to the nucleus agree with CCP4 within 0.02 Å except the peptide N-H
# (Allen & Bruno's 1.009 vs CCP4's 1.036).  Electron-cloud distances follow two conventions
# (SHELXL's riding distances here, acedrg's X-ray statistics in CCP4): up to 0.054 Å apart
# (peptide N-H 0.86 vs 0.914), so they are held to 0.06 Å.
H_TOLERANCE = {"nucleus": 0.02, "electron": 0.06}
KNOWN_H_DIFFERENCES = {("nucleus", "H-N")}


def _protein_with_h(shared):
    st = gemmi.read_structure(str(shared / MODELS["3j6b"]))
    st.setup_entities()
    assert sum(c.atom.is_hydrogen() for c in st[0].all()) > 1000
    return Model.from_gemmi(st)


@pytest.mark.parametrize("h_distances", ["electron", "nucleus"])
def test_hydrogen_restraints_match_ccp4(shared, h_distances):
    """3J6B chain 9 with its H (every amino acid but MSE) and the nucleotide strands with
    theirs: the same restraints on H as CCP4 applies, with the same ideal values."""
    for model in (_protein_with_h(shared), _dinucleotides(shared, hydrogens=True)):
        names = [c.atom.name for c in model.structure[0].all()]
        is_h = np.array([model.element[i] == "H" for i in range(model.n_atoms)])
        tables = []
        for lib in (None, shared / "monomers"):
            topo = build_topology(model, monlib=lib, h_distances=h_distances)
            assert len(topo.unrestrained) == 0
            tables.append(_applied_terms(topo))
        ours, ccp4 = tables
        for kind, tol in (("bonds", H_TOLERANCE[h_distances]), ("angles", 2.0)):
            with_h = {k for k in ccp4[kind] if is_h[list(k)].any()}
            assert with_h and with_h == {k for k in ours[kind] if is_h[list(k)].any()}, kind
            bad = {(h_distances, _name(names, k)) for k in with_h
                   if abs(ours[kind][k] - ccp4[kind][k]) > tol}
            assert bad <= KNOWN_H_DIFFERENCES, f"{kind} beyond {tol}: {sorted(bad)}"
        _same_hands_and_planes(names, ours, ccp4)
        assert any(is_h[list(p)].any() for p in ours["planes"])


def test_model_with_hydrogens_regularises_with_builtin_dictionary(shared):
    model = _protein_with_h(shared)
    restraints = GeometryRestraints(build_topology(model), backend="numpy", dtype=np.float64)
    batch = shaken_batch(model, 2, 0.3, seed=1, backend="numpy", dtype=np.float64)
    regularize(batch, restraints)
    for r in geometry_statistics(restraints, batch.xyz):
        assert r["rmsd_bonds"] < 0.01 and r["rmsd_angles"] < 1.5 and r["rmsd_planes"] < 0.01
    h = np.nonzero(model.element == "H")[0]
    bonds = restraints.topology.bonds.atoms
    xh = bonds[np.isin(bonds[:, 1], h) | np.isin(bonds[:, 0], h)]
    assert len(np.unique(xh)) > len(h)      # every H bonded to its parent
    d = np.linalg.norm(batch.xyz[:, xh[:, 0]] - batch.xyz[:, xh[:, 1]], axis=-1)
    assert 0.8 < d.min() and d.max() < 1.25
