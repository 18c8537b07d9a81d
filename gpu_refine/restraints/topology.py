"""gemmi topology → index arrays, built once per Model and shared by every model of a batch.

``build_topology(model)`` runs ``gemmi.prepare_topology`` with a monomer library (see
``library``) and keeps, for each restraint type, the atom indices (into the Model's atom order),
ideal values and sigmas.  Counts equal gemmi's (altloc atoms are restrained per conformer).

Polymers are linked by sequence: consecutive residues whose C(i)-N(i+1) (or O3'(i)-P(i+1))
distance is beyond gemmi's bond cut-off but within ``link_distance`` still get their peptide
(phosphodiester) link, as cctbx does.  Otherwise a shaken or badly fitted start loses its chain
links and refinement pulls the chain apart.

Other covalent links come from the file's records (SSBOND, LINK, struct_conn; a record that
the library does not define becomes a bond of the covalent radii, except to a metal) and, with
``find_links`` (default), from distances: gemmi's search for contacts that a library link
defines (within 1.4 × its bond length), as phenix and Refmac make disulfides (and phenix
glycosylation links) from distances by default.  Without it a model written without SSBOND
records would have its disulfides pushed apart by nonbonded repulsion.  A link to a symmetry
mate is restrained on the mate's image of its second residue: restraint atoms past the model's
atoms are images (R x + t, ``Topology.mate_atom``), which the restraints place before each
evaluation; the linked atoms do not repel each other's images.
"""
import io
import logging
import re
from collections import Counter
from dataclasses import dataclass, field

import gemmi
import numpy as np
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from ..errors import InputError, ParameterError
from ..grid import space_group_operations, symmetry_contacts
from ..model import atom_labels
from .library import read_library

log = logging.getLogger(__name__)

CHIRAL_SIGMA = 0.2     # Å³, as refmac and servalcat use for chiral volumes
LINK_DISTANCE = 4.5    # Å, longest C-N or O3'-P distance still linked by sequence
LONGEST_BOND = 10.0    # Å, beyond this a restrained bond is an atom misplaced, not strain
SELF_LINK_REACH = 3.0  # Å, longest contact of a residue with its own image taken for a link
PACKING_CLASH = 1.0    # Å, closer than this to a symmetry mate an atom's cell is not a crystal's
H_DISTANCES = ("electron", "nucleus")
COINCIDENT = 0.01      # Å, atoms of one conformer this close give their restraints no direction


@dataclass
class Terms:
    """One restraint type: atoms (R, k) int32, ideal and sigma (R,) float64 in library units
    (Å, degrees, Å³).  Torsions add ``period``; chiral volumes add ``sign`` (+1, -1, 0 = either).
    Planes use ``ptr`` (P+1,) into flat ``atoms`` (M,) and per-member ``sigma`` (M,)."""
    atoms: np.ndarray
    ideal: np.ndarray = None
    sigma: np.ndarray = None
    period: np.ndarray = None
    sign: np.ndarray = None
    ptr: np.ndarray = None

    def __len__(self):
        return len(self.ptr) - 1 if self.ptr is not None else len(self.atoms)


@dataclass
class Topology:
    n_atoms: int
    labels: np.ndarray            # (N,) "chain/RES seq/name[.alt]"
    altloc: np.ndarray            # (N,) str, "" where none
    element: np.ndarray           # (N,) str
    bonds: Terms
    angles: Terms
    torsions: Terms
    chirals: Terms
    planes: Terms
    links: Counter = field(default_factory=Counter)   # link id -> count (polymer + extra)
    unrestrained: np.ndarray = None   # indices of atoms with no dictionary definition
    library: str = ""
    occupancy: np.ndarray = None  # (N,) of the model the topology was built from
    cell: tuple = None            # (a, b, c, alpha, beta, gamma) of a crystal, else None
    spacegroup: str = None        # its space group (Hermann-Mauguin), else None
    # (K, 2) atoms linked to each other's symmetry mate: not repelled by its image
    symmetry_links: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    # Images that links to symmetry mates restrain: restraint atom n_atoms + v is atom
    # mate_atom[v] placed at mate_rot[v] x + mate_shift[v] (Cartesian, Å).
    mate_atom: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    mate_rot: np.ndarray = field(default_factory=lambda: np.zeros((0, 3, 3)))
    mate_shift: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))

    @property
    def n_mates(self):
        return len(self.mate_atom)

    def label(self, a):
        """Label of restraint atom ``a`` (an index past the atoms is a symmetry mate's)."""
        if a < self.n_atoms:
            return str(self.labels[a])
        return f"{self.labels[self.mate_atom[a - self.n_atoms]]} (symmetry mate)"

    def hydrogen_parents(self):
        """(N,) the atom each hydrogen (or deuterium) is bonded to, -1 for other atoms and for
        a hydrogen with no bond to a heavier atom of the model."""
        parent = np.full(self.n_atoms, -1, np.int64)
        is_h = np.isin(self.element, ("H", "D"))
        atoms = self.bonds.atoms[(self.bonds.atoms < self.n_atoms).all(axis=1)]
        for h, other in ((atoms[:, 0], atoms[:, 1]), (atoms[:, 1], atoms[:, 0])):
            riding = is_h[h] & ~is_h[other]
            parent[h[riding]] = other[riding]
        return parent

    def coincident(self, coords, noun="model"):
        """One line per model of ``coords`` (B, N, 3) naming atoms of one conformer that lie
        on each other (within COINCIDENT Å), "{noun} k: " before it where B > 1.  A restraint
        between them has no direction (its gradient is not a number): such a model (atoms a
        program put at one place, a residue pasted twice) cannot be refined or regularised
        until one is moved."""
        return coincident_problems(coords, self.altloc, self.label, noun,
                                   "restraints cannot tell which way to separate them; move "
                                   "or remove one")

    def stretched(self, coords, noun="model", limit=LONGEST_BOND):
        """One line per model of ``coords`` (B, N, 3) with a restrained bond longer than
        ``limit`` Å (an atom far from its neighbours: a coordinate typed wrong), naming the
        longest; no refinement pulls it back over such a distance."""
        atoms = self.bonds.atoms[(self.bonds.atoms < self.n_atoms).all(axis=1)]
        problems = []
        for k, xyz in enumerate(np.asarray(coords, dtype=np.float64)):
            length = np.linalg.norm(xyz[atoms[:, 0]] - xyz[atoms[:, 1]], axis=-1)
            if not len(length) or length.max() <= limit:
                continue
            i, j = atoms[int(np.argmax(length))]
            problems.append(f"{f'{noun} {k + 1}: ' if len(coords) > 1 else ''}the bond "
                            f"{self.label(i)} - {self.label(j)} is {length.max():.0f} Å long: "
                            "one of its atoms lies far from its neighbours; move it back")
        return problems

    def counts(self):
        return {"n_bonds": len(self.bonds), "n_angles": len(self.angles),
                "n_torsions": len(self.torsions), "n_chirals": len(self.chirals),
                "n_planes": len(self.planes)}


# Å: the longest library link gemmi's distance search reaches for (1.4 × ~2.9 Å).
LINK_REACH = 4.0
# Beyond this many pairs within COINCIDENT Å (a pile of copies), they are counted, not listed.
_MAX_LISTED_PAIRS = 1_000_000
# Atoms per Å³ that no molecule exceeds: protein with its H holds about 0.1.
MAX_ATOM_DENSITY = 0.3


def close_pair_count(xyz, radius):
    """How many pairs of ``xyz`` (N, 3) lie within ``radius`` Å, counted without listing them:
    atoms on one spot are one weighted point of a k-d tree (a tree cannot split a pile of
    copies, and would compare them all with each other)."""
    spots, counts = np.unique(np.asarray(xyz, dtype=np.float64), axis=0, return_counts=True)
    tree, w = cKDTree(spots), counts.astype(np.float64)
    return int(round((tree.count_neighbors(tree, radius, weights=(w, w)) - counts.sum()) / 2))


def coincident_pairs(xyz, altloc):
    """(n, (i, j)): how many pairs of atoms of one conformer (the same altloc, or one without)
    lie within COINCIDENT Å of each other in ``xyz`` (N, 3), and the first such pair, or
    (0, None).  The pairs are counted before any is listed, so that a pile of 100,000 copies
    of one atom costs a second, not the 10^10 pairs' memory."""
    xyz = np.asarray(xyz, dtype=np.float64)
    close = close_pair_count(xyz, COINCIDENT)
    if close == 0:
        return 0, None
    if close > _MAX_LISTED_PAIRS:
        # Name two atoms on the most crowded spot; count every pair, whatever the altlocs.
        _, inverse, counts = np.unique(xyz, axis=0, return_inverse=True, return_counts=True)
        atoms = np.flatnonzero(inverse.ravel() == int(np.argmax(counts)))[:2]
        return close, (tuple(int(a) for a in atoms) if len(atoms) == 2 else None)
    pairs = cKDTree(xyz).query_pairs(COINCIDENT, output_type="ndarray")
    alt = np.asarray(altloc)[pairs]
    pairs = pairs[(alt[:, 0] == alt[:, 1]) | (alt == "").any(axis=1)]
    if not len(pairs):
        return 0, None
    return len(pairs), min(map(tuple, pairs.tolist()))


def coincident_problems(coords, altloc, label, noun, remedy):
    """One line per model of ``coords`` (B, N, 3) with atoms of one conformer on each other
    (``coincident_pairs``), naming the first pair by ``label`` (index -> text), "{noun} k: "
    before it where B > 1, and ``remedy`` after it."""
    problems = []
    for k, xyz in enumerate(np.asarray(coords, dtype=np.float64)):
        n, pair = coincident_pairs(xyz, altloc)
        if not n:
            continue
        more = f" (and {n - 1} more pair{'s' if n > 2 else ''})" if n > 1 else ""
        which = (f"atoms {label(pair[0])} and {label(pair[1])} lie on each other{more}"
                 if pair else f"{n} pairs of atoms lie on each other")
        problems.append(f"{f'{noun} {k + 1}: ' if len(coords) > 1 else ''}{which}: {remedy}")
    return problems


def check_packing(xyz, radius, label, altloc):
    """InputError where atoms ``xyz`` (N, 3) are packed more densely than in any molecule (a
    pile of copies at one spot), before the pairs within ``radius`` Å are listed (link
    search, nonbonded pairs), which would take the square of their number.  ``label`` names
    an atom by its index."""
    n = len(xyz)
    pairs = close_pair_count(xyz, radius)
    if pairs <= n * (MAX_ATOM_DENSITY * 4.0 / 3.0 * np.pi * radius**3 + 50) / 2:
        return
    _, pair = coincident_pairs(xyz, altloc)
    example = f"; e.g. {label(pair[0])} and {label(pair[1])} lie on each other" if pair else ""
    raise InputError(f"the atoms are packed more densely than in any molecule ({pairs} pairs "
                     f"within {radius:.1f} Å among {n} atoms){example}: remove the copies")


def _consecutive(r1, r2):
    n1, n2 = r1.seqid.num, r2.seqid.num
    return n2 == n1 + 1 or (n2 == n1 and r1.seqid.icode != r2.seqid.icode)


def _polymer_pairs(st):
    """(the chain's residues, i, "peptide" | "nucleic") for each residue i of ``st``'s first
    model followed in sequence by one of the same polymer kind (both tabulated by gemmi)."""
    for ch in st[0]:
        residues = list(ch)
        for i, (r1, r2) in enumerate(zip(residues, residues[1:])):
            info1, info2 = gemmi.find_tabulated_residue(r1.name), gemmi.find_tabulated_residue(r2.name)
            if info1 is None or info2 is None or not _consecutive(r1, r2):
                continue
            if info1.is_amino_acid() and info2.is_amino_acid():
                yield residues, i, "peptide"
            elif info1.is_nucleic_acid() and info2.is_nucleic_acid():
                yield residues, i, "nucleic"


def _link_by_sequence(st, link_distance):
    """Move, in this (scratch) copy, the N (or P) of a sequence-consecutive residue onto bond
    distance from C (O3') so that gemmi links the pair.  The move is along the C-N line, which
    keeps the omega angle and hence gemmi's cis/trans choice.  Returns the number moved."""
    moved = 0
    for residues, i, kind in _polymer_pairs(st):
        a_name, b_name, ideal, cut = (("C", "N", 1.33, 1.341 * 1.5) if kind == "peptide"
                                      else ("O3'", "P", 1.60, 1.6 * 1.5))
        a = residues[i].find_atom(a_name, "*")
        if a is None:
            continue
        for b in residues[i + 1]:
            d = b.pos.dist(a.pos)
            if b.name == b_name and cut <= d < link_distance:
                b.pos = a.pos + (b.pos - a.pos) * (ideal / d)
                moved += 1
    return moved


def _all_trans(st):
    """Turn, in this (scratch) copy, every peptide with omega within 90° of 0 (gemmi links one
    within 60° as cis) to omega 180°: the residues after its C-N bond rotate rigidly about that
    bond, which changes no other torsion, so that gemmi links every peptide as trans.  Returns
    how many were turned."""
    turned = 0
    for residues, i, kind in _polymer_pairs(st):
        r1, r2 = residues[i], residues[i + 1]
        atoms = (r1.find_atom("CA", "*"), r1.find_atom("C", "*"), r2.find_atom("N", "*"),
                 r2.find_atom("CA", "*"))
        if kind != "peptide" or None in atoms or atoms[1].pos.dist(atoms[2].pos) > 2.0:
            continue
        omega = gemmi.calculate_dihedral(*(a.pos for a in atoms))
        if abs(omega) >= np.pi / 2:
            continue
        c1, n2 = (np.array(a.pos.tolist()) for a in atoms[1:3])
        # A right-handed turn about C->N adds its angle to the dihedral CA-C-N-CA.
        axis = (n2 - c1) / np.linalg.norm(n2 - c1)
        turn = Rotation.from_rotvec((np.pi - omega) * axis)
        for res in residues[i + 1:]:
            for a in res:
                a.pos = gemmi.Position(*(turn.apply(np.array(a.pos.tolist()) - c1) + c1))
        turned += 1
    return turned


def _cis_peptides(topo, st):
    """Labels ("chain/RES n-RES m") of the peptides gemmi linked cis: (non-proline ones the
    file's cis-peptide records (CISPEP, struct_mon_prot_cis) of ``st`` do not list, the
    others)."""
    recorded = {(c.partner_c.chain_name, str(c.partner_c.res_id.seqid).strip())
                for c in st.cispeps}
    unlisted, others = [], []
    for chain_info in topo.chain_infos:
        for ri in chain_info.res_infos:
            for link in ri.prev:
                if link.link_id not in ("CIS", "PCIS"):
                    continue
                chain, first = chain_info.chain_ref.name, str(link.res1.seqid).strip()
                label = (f"{chain}/{link.res1.name} {first}-{link.res2.name} "
                         f"{str(link.res2.seqid).strip()}")
                listed = link.link_id == "PCIS" or (chain, first) in recorded
                (others if listed else unlisted).append(label)
    return unlisted, others


def _find_links(st, lib, crystal):
    """Add to ``st`` (build_topology's scratch copy) the links gemmi finds by distance that
    ``lib`` defines, and, in a ``crystal`` (``_crystal``), those of a residue to its own
    symmetry image, which gemmi's search passes over; returns how many of each link id.  gemmi also proposes metal coordination,
    which has no library link: like phenix and Refmac by default, that is not made a bond."""
    given = list(st.connections)
    gemmi.add_automatic_links(st[0], st, lib)
    found = [c for c in list(st.connections)[len(given):] if c.link_id]
    found += _self_image_links(st, lib, crystal) if crystal else []
    for c in found:
        # gemmi marks a link to a lattice translate of the model (no rotation) as in the
        # same unit: where the atoms themselves are not at the found distance, it is not.
        d = st[0].find_cra(c.partner1).atom.pos.dist(st[0].find_cra(c.partner2).atom.pos)
        if abs(d - c.reported_distance) > 1e-3:
            c.asu = gemmi.Asu.Different
    st.connections.clear()
    for c in given + found:
        st.connections.append(c)
    return Counter(c.link_id for c in found)


def _self_image_links(st, lib, crystal):
    """Connections of a residue to its own symmetry image (a disulfide across a 2-fold between
    equal cysteines): atom pairs that a library link joins, within 1.4 × its bond length as
    gemmi's search takes them, in ``crystal`` (``_crystal``: cell and space group)."""
    residues = [(ch, res) for ch in st[0] for res in ch]
    atoms = [(ch, res, at) for ch, res in residues for at in res]
    residue = np.repeat(np.arange(len(residues)), [len(res) for _, res in residues])
    if not atoms:
        return []
    xyz = np.array([at.pos.tolist() for *_, at in atoms])

    def key(address):
        return (address.chain_name, str(address.res_id.seqid), address.atom_name,
                address.altloc)
    given = {frozenset((key(con.partner1), key(con.partner2))) for con in st.connections}
    found = []
    for i, j, d, _, _ in symmetry_contacts(xyz, crystal["cell"],
                                           space_group_operations(crystal["spacegroup"]),
                                           SELF_LINK_REACH):
        for a, b, dist in zip(i.tolist(), j.tolist(), d.tolist()):
            if residue[a] != residue[b] or a > b:
                continue
            ch, res, a1 = atoms[a]
            a2 = atoms[b][2]
            link, inverted, _, _ = lib.match_link(res, a1.name, a1.altloc, res, a2.name,
                                                  a2.altloc)
            bonds = list(link.rt.bonds) if link is not None else []
            if not bonds or dist > 1.4 * bonds[0].value:
                continue
            ends = (gemmi.make_address(ch, res, a1), gemmi.make_address(ch, res, a2))
            if frozenset(map(key, ends)) in given:     # a record, or another image's contact
                continue
            given.add(frozenset(map(key, ends)))
            con = gemmi.Connection()
            con.name, con.link_id, con.asu = f"self{len(found) + 1}", link.id, gemmi.Asu.Different
            con.type = (gemmi.ConnectionType.Disulf if a1.name == a2.name == "SG"
                        else gemmi.ConnectionType.Covale)
            con.partner1, con.partner2 = ends[::-1] if inverted else ends
            con.reported_distance = dist
            found.append(con)
    return found


def _link_comps(kind, t):
    """The residue (1 or 2, the library link's comp) of each atom of ``t``, a link's restraint
    of ``kind``; None where a plane's atoms cannot be matched to its definition."""
    r = t.restr
    if kind == gemmi.RKind.Plane:
        # The plane's atoms are those of its definition that were found, in that order.
        names, comps = [a.name for a in t.atoms], []
        for aid in r.ids:
            if len(comps) < len(names) and names[len(comps)] == aid.atom:
                comps.append(aid.comp)
        return comps if len(comps) == len(names) else None
    ids = {gemmi.RKind.Bond: ("id1", "id2"), gemmi.RKind.Angle: ("id1", "id2", "id3"),
           gemmi.RKind.Torsion: ("id1", "id2", "id3", "id4"),
           gemmi.RKind.Chirality: ("id_ctr", "id1", "id2", "id3")}[kind]
    return [getattr(r, name).comp for name in ids]


class _MateImages:
    """The images of atoms that links to symmetry mates restrain (virtual atoms past the
    model's ``n_atoms``), at positions ``xyz`` in a crystal's ``cell`` (a gemmi UnitCell with
    its images set up, or None where the model is no crystal)."""

    def __init__(self, n_atoms, xyz, cell):
        self.n, self.xyz, self.cell = n_atoms, np.asarray(xyz, dtype=np.float64), cell
        if cell is not None:
            self.orth = np.array(cell.orth.mat.tolist())
            self.frac = np.array(cell.frac.mat.tolist())
        self.atom, self.rot, self.shift, self._where = [], [], [], {}

    def _transform(self, i, j):
        """Cartesian (R, t) of the image of atom j nearest atom i, the identity left out."""
        near = self.cell.find_nearest_image(gemmi.Position(*self.xyz[i]),
                                            gemmi.Position(*self.xyz[j]), gemmi.Asu.Different)
        rot, tran = np.eye(3), np.zeros(3)
        if near.sym_idx:
            image = self.cell.images[near.sym_idx - 1]
            rot, tran = np.array(image.mat.tolist()), np.array(image.vec.tolist())
        tran = tran + np.asarray(near.pbc_shift, dtype=np.float64)
        return self.orth @ rot @ self.frac, self.orth @ tran

    def _virtual(self, j, rot, shift):
        key = (j, np.round(rot, 6).tobytes(), np.round(shift, 4).tobytes())
        if key not in self._where:
            self._where[key] = self.n + len(self.atom)
            self.atom.append(j)
            self.rot.append(rot)
            self.shift.append(shift)
        return self._where[key]

    def restraints(self, link, restraint_lists):
        """{(rkind, index): atoms} for the restraints of ``link`` with the atoms of its second
        residue (the library link's comp 2) replaced by their images, placed where the bond's
        second atom has its image nearest the first; None where there is no crystal to place
        them, or the comps cannot be told."""
        if self.cell is None:
            return None
        rules = {}
        for r in link.link_rules:
            t = restraint_lists[r.rkind][r.index]
            comps = _link_comps(r.rkind, t)
            if comps is None:
                return None
            rules[(r.rkind, r.index)] = (_index(t.atoms), comps)
        bond = next((v for (kind, _), v in rules.items() if kind == gemmi.RKind.Bond), None)
        if bond is None or sorted(bond[1]) != [1, 2]:
            return None
        i, j = (a for a, _ in sorted(zip(*bond), key=lambda p: p[1]))
        rot, shift = self._transform(i, j)
        return {key: [self._virtual(a, rot, shift) if c == 2 else a for a, c in zip(*v)]
                for key, v in rules.items()}

    def arrays(self):
        return {"mate_atom": np.array(self.atom, np.int64),
                "mate_rot": np.array(self.rot, np.float64).reshape(-1, 3, 3),
                "mate_shift": np.array(self.shift, np.float64).reshape(-1, 3)}


def _link_rules(topo, lib, images):
    """How the restraints of the extra links (``topo.extras``) are kept.  A link to a
    symmetry mate is restrained on the image of its second residue (``images``); where
    that cannot be placed it is left out.  Gemmi's ad-hoc bonds (a record the library does
    not define) where one atom is a metal are left out, their covalent radii missing
    coordination distances by up to 0.1 Å (the metal's nonbonded distances stand instead).
    Returns ({restraint kind: set of indices left out}, {(kind, index): atoms on images},
    (K, 2) atoms linked to a symmetry mate, Counter of the ad-hoc bonds kept, by residue
    pair, number of metal links left out, numbers of links to mates restrained on images and
    left out)."""
    restraint_lists = {gemmi.RKind.Bond: topo.bonds, gemmi.RKind.Angle: topo.angles,
                       gemmi.RKind.Torsion: topo.torsions, gemmi.RKind.Chirality: topo.chirs,
                       gemmi.RKind.Plane: topo.planes}
    rules, on_images, pairs, made, metal = {}, {}, [], Counter(), 0
    placed_links, unplaced = 0, 0
    for link in topo.extras:
        ad_hoc = lib.links[link.link_id].name.startswith("auto-")
        bonds = [topo.bonds[r.index].atoms for r in link.link_rules
                 if r.rkind == gemmi.RKind.Bond]
        to_mate = link.asu == gemmi.Asu.Different
        with_metal = ad_hoc and any(a.element.is_metal for b in bonds for a in b)
        placed = None
        if to_mate:
            pairs += [_index(b) for b in bonds]
            placed = None if with_metal else images.restraints(link, restraint_lists)
            placed_links += placed is not None
            unplaced += placed is None and not with_metal
        if with_metal:
            metal += 1
        elif ad_hoc:
            made[f"{link.res1.name}-{link.res2.name}"] += 1
        if placed is not None:
            on_images.update(placed)
        elif to_mate or with_metal:
            for rule in link.link_rules:
                rules.setdefault(rule.rkind, set()).add(rule.index)
    return (rules, on_images, np.array(pairs, np.int64).reshape(-1, 2), made, metal,
            placed_links, unplaced)


def check_h_distances(value):
    """ParameterError unless ``value`` is one of H_DISTANCES."""
    if value not in H_DISTANCES:
        raise ParameterError(f"h_distances must be {' or '.join(H_DISTANCES)}, not {value!r}")


def ccp4_hydrogen_names(st):
    """Name the N-terminal H1 of amino acids (phenix/reduce style) H, as the CCP4 library does
    (H, H2, H3), in ``st`` (build_topology's scratch copy); returns the number renamed."""
    renamed = 0
    for res in (r for ch in st[0] for r in ch):
        info = gemmi.find_tabulated_residue(res.name)
        if info is None or not info.is_amino_acid():
            continue
        names = {(a.name, a.altloc) for a in res}
        for a in res:
            if a.name == "H1" and ("H", a.altloc) not in names:
                a.name = "H"
                renamed += 1
    return renamed


def _at(atom):
    return int(atom.b_iso)


def _index(atoms):
    return [_at(a) for a in atoms]


def build_topology(model, monlib=None, dictionaries=(), ignore_unknown=False,
                   link_distance=LINK_DISTANCE, h_distances="electron", find_links=True,
                   apply_all_trans=False):
    """Topology of ``model`` (a Model) from a monomer library.

    monlib: library directory (else $CLIBD_MON, else the built-in dictionary); dictionaries:
    extra monomer CIF files; ignore_unknown: leave residues without a dictionary unrestrained
    instead of failing; h_distances: X-H bond targets to the electron cloud (X-ray, the
    library's value_dist) or to the nucleus (neutron; value_dist_nucleus); find_links: add
    the library's links (disulfides, glycosylation, ...) found from distances to those of the
    file's records; apply_all_trans: restrain every peptide trans, whatever its omega in the
    model (phenix's apply_all_trans; otherwise gemmi links a peptide within 60° of cis as cis,
    and non-proline ones are pointed out).
    """
    check_h_distances(h_distances)
    if model.n_atoms == 0:
        raise InputError("the model has no atoms")
    st = model.structure.clone()
    # Each atom of this scratch copy carries its index in b_iso (exact in float32 up to 2^24):
    # prepare_topology renumbers serials, and B plays no part in the topology.
    if model.n_atoms >= 2 ** 24:
        raise InputError("models of more than 16.7 million atoms are not supported")
    for i, cra in enumerate(st[0].all()):
        cra.atom.b_iso = i
    resnames = set(st[0].get_all_residue_names())
    lib, where, missing = read_library(resnames, monlib, dictionaries)
    labels, altloc = atom_labels(st)
    # Before the link search and the nonbonded pairs, each of which lists close pairs.
    check_packing(model.xyz, LINK_REACH, model.atom_label, model.altloc)
    names, counts = np.unique(labels, return_counts=True)
    if (counts > 1).any():
        raise InputError(f"duplicated atoms (the same name and altloc in one residue): "
                         f"{', '.join(names[counts > 1][:5])}; remove them or give them "
                         "altlocs (or, where two chains share a name and residue numbers, "
                         "which the file's reader merges into one chain, rename one)")
    unrestrained = []
    index_of = {lab: k for k, lab in enumerate(labels)}
    if missing:
        if not ignore_unknown:
            raise InputError(
                f"no restraint dictionary for residue(s) {', '.join(missing)} in {where}; "
                "give a monomer CIF with dictionary=FILE.cif (or a library with monlib=DIR), "
                "or ignore_unknown=true to leave them unrestrained")
        for ch in st[0]:
            for k in reversed(range(len(ch))):
                if ch[k].name in missing:
                    unrestrained.extend(_at(a) for a in ch[k])
                    del ch[k]
        log.warning("%d atoms of residue(s) %s have no dictionary and are left unrestrained",
                    len(unrestrained), ", ".join(missing))
    crystal = _crystal(st, model)
    renamed = ccp4_hydrogen_names(st)
    if renamed:
        log.info("%d N-terminal H1 restrained as the library's H", renamed)
    if link_distance:
        moved = _link_by_sequence(st, link_distance)
        if moved:
            log.info("%d polymer links made by sequence (C-N or O3'-P beyond bond distance)",
                     moved)
    if find_links:
        found = _find_links(st, lib, crystal)
        if found:
            log.info("links found from distances (not in the file's records): %s",
                     ", ".join(f"{k} {v}" for k, v in sorted(found.items())))
    if apply_all_trans:
        # After the links found from distances: the turns move whole chain ends.
        turned = _all_trans(st)
        if turned:
            log.info("apply_all_trans: %d peptide(s) with omega within 90° of cis restrained "
                     "trans", turned)
        if len(model.structure.cispeps):
            log.warning("apply_all_trans: the file's %d cis-peptide record(s) are overridden "
                        "(every peptide is restrained trans)", len(model.structure.cispeps))
    warnings = io.StringIO()
    try:
        # A link record that the library does not define becomes a bond of the two atoms'
        # covalent radii (gemmi's "auto-" links, as Servalcat makes them), not a clash.
        topo = gemmi.prepare_topology(st, lib, h_change=gemmi.HydrogenChange.NoChange,
                                      reorder=False, warnings=warnings,
                                      ignore_unknown_links=False)
    except Exception as exc:
        raise InputError(f"cannot build the restraint topology: {exc}") from None
    no_def = re.findall(r"definition not found for (.+)$", warnings.getvalue(), re.M)
    if no_def:
        unrestrained.extend(index_of[lab] for lab in no_def if lab in index_of)
        log.warning("%d atoms have no definition in their residue's dictionary and are "
                    "unrestrained (e.g. %s)", len(no_def), ", ".join(no_def[:3]))
    for line in warnings.getvalue().splitlines():
        if "definition not found" not in line and line.strip():
            log.info("topology: %s", line.strip())
    unlisted, others = _cis_peptides(topo, model.structure)
    if unlisted:
        # About 0.03 % of non-proline peptides are cis; a shaken or poorly built start has
        # many more omegas within 60° of 0 (3J6B chain 9 shaken by 0.5 Å: 5 of 194).
        log.warning("%d non-proline cis peptide(s) that the file's cis-peptide records do not "
                    "list (omega within 60° of 0 in the model), restrained cis: %s%s; rare in "
                    "proteins: check them, or give apply_all_trans=true to restrain every "
                    "peptide trans", len(unlisted), ", ".join(unlisted[:5]),
                    ", ..." if len(unlisted) > 5 else "")
    if others:
        log.info("%d cis peptide(s) (before a proline, or in the file's records) restrained "
                 "cis: %s%s", len(others), ", ".join(others[:5]),
                 ", ..." if len(others) > 5 else "")

    if crystal:
        st.setup_cell_images()
    images = _MateImages(model.n_atoms, model.xyz, st.cell if crystal else None)
    (skip, on_images, symmetry_links, made, metal, placed,
     unplaced) = _link_rules(topo, lib, images)
    if made:
        log.warning("%d link record(s) that the library does not define are restrained as a "
                    "bond only (covalent radii): %s", sum(made.values()),
                    ", ".join(f"{k} {v}" for k, v in sorted(made.items())))
    if metal:
        log.info("%d metal link record(s) without library values are not restrained (the "
                 "metal's nonbonded distances hold them)", metal)
    if placed:
        log.info("%d link(s) to symmetry mates restrained on the mates' images (their atoms "
                 "do not repel each other's images)", placed)
    if unplaced:
        log.warning("%d link(s) to symmetry mates are not restrained (no crystal cell to "
                    "place the mate, or atoms not matched to the link's definition)", unplaced)

    def kept(items, kind):
        """(restraint, its atom indices) of the restraints of ``kind`` kept."""
        drop = skip.get(kind, ())
        return [(t, on_images.get((kind, k)) or _index(t.atoms))
                for k, t in enumerate(items) if k not in drop]

    def simple(items, n):
        if not items:
            return Terms(np.zeros((0, n), np.int32), np.zeros(0), np.zeros(0))
        return Terms(np.array([atoms for _, atoms in items], np.int32),
                     np.array([t.restr.value for t, _ in items], np.float64),
                     np.array([t.restr.esd for t, _ in items], np.float64))

    bond_list = kept(topo.bonds, gemmi.RKind.Bond)
    bonds = simple(bond_list, 2)
    if h_distances == "nucleus" and len(bonds):
        # Libraries give value_dist_nucleus for X-H bonds; other bonds keep value_dist.
        nucleus = np.array([b.restr.value_nucleus for b, _ in bond_list])
        esd = np.array([b.restr.esd_nucleus for b, _ in bond_list])
        use = np.isfinite(nucleus) & (nucleus > 0) & np.isfinite(esd) & (esd > 0)
        bonds.ideal = np.where(use, nucleus, bonds.ideal)
        bonds.sigma = np.where(use, esd, bonds.sigma)
    angles = simple(kept(topo.angles, gemmi.RKind.Angle), 3)
    torsion_list = kept(topo.torsions, gemmi.RKind.Torsion)
    torsions = simple(torsion_list, 4)
    torsions.period = np.array([t.restr.period for t, _ in torsion_list], np.int32)
    signs = {gemmi.ChiralityType.Positive: 1, gemmi.ChiralityType.Negative: -1}
    chirs = kept(topo.chirs, gemmi.RKind.Chirality)
    chirals = Terms(np.array([atoms for _, atoms in chirs], np.int32).reshape(-1, 4),
                    np.array([topo.ideal_chiral_abs_volume(c) for c, _ in chirs], np.float64),
                    np.full(len(chirs), CHIRAL_SIGMA),
                    sign=np.array([signs.get(c.restr.sign, 0) for c, _ in chirs], np.int8))
    plane_list = kept(topo.planes, gemmi.RKind.Plane)
    sizes = [len(atoms) for _, atoms in plane_list]
    planes = Terms(np.array([i for _, atoms in plane_list for i in atoms], np.int32),
                   sigma=np.repeat([p.restr.esd for p, _ in plane_list], sizes).astype(np.float64),
                   ptr=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32))
    links = Counter()
    for chain_info in topo.chain_infos:
        for ri in chain_info.res_infos:
            for link in ri.prev:
                if link.link_id:
                    links[link.link_id] += 1
    for extra in topo.extras:
        links[extra.link_id] += 1
    return Topology(n_atoms=model.n_atoms, labels=labels, altloc=altloc,
                    element=np.asarray(model.element), bonds=bonds, angles=angles,
                    torsions=torsions, chirals=chirals, planes=planes, links=links,
                    unrestrained=np.array(sorted(set(unrestrained)), dtype=np.int64),
                    library=where, occupancy=np.asarray(model.occ, dtype=np.float64),
                    symmetry_links=symmetry_links, **images.arrays(), **crystal)


def _crystal(st, model):
    """Cell and space group of a crystal model, for contacts with symmetry mates: none for a
    cryo-EM model's 1 Å or missing cell, nor for a cell that puts mates on top of the model
    (a cryo-EM map's box written as CRYST1, smaller than the model), whose "mates" would
    repel and link the model to itself; ``st`` (the scratch copy) then loses its cell too."""
    sg = st.find_spacegroup()
    if not st.cell.is_crystal() or sg is None:
        return {}
    c = st.cell
    cell = (c.a, c.b, c.c, c.alpha, c.beta, c.gamma)
    # Atoms of full occupancy within PACKING_CLASH of another atom's image cannot both be
    # there (an atom near its own image sits on a special position).
    full = np.asarray(model.occ) >= 1.0
    limit = max(10, 0.01 * model.n_atoms)
    clashing = set()
    for i, j, _, _, _ in symmetry_contacts(model.xyz, cell, space_group_operations(sg.hm),
                                           PACKING_CLASH):
        both = (i != j) & full[i] & full[j]
        clashing.update(i[both].tolist())
        if len(clashing) > limit:      # a small cell has many images: enough seen
            break
    if len(clashing) > limit:
        log.warning("the model's cell (%s, %s) puts symmetry mates within %.1f Å of more than "
                    "%d of its atoms: not a crystal's packing (a map box written as the cell?); "
                    "symmetry mates are left out", " ".join(f"{x:g}" for x in cell), sg.hm,
                    PACKING_CLASH, int(limit))
        st.cell = gemmi.UnitCell()
        return {}
    return {"cell": cell, "spacegroup": sg.hm}