"""Nonbonded repulsion: one pair list for a whole batch, rebuilt only when atoms have moved.

Pairs are all atom pairs closer than their minimum distance plus a margin, except 1-2 and 1-3
pairs (bonded, or bonded to a common atom), pairs of different alternative conformations and
atoms without a dictionary definition.  1-4 pairs are kept with their minimum distance scaled
by ``one_four_factor`` (as phenix's vdw_1_4_factor).  The list is the union over the models of
a batch: candidates come from a search around the batch mean with the radius grown by twice the
largest deviation from it; a candidate is kept when some model has it within dmin + margin.  It
is rebuilt when any atom of any model has moved more than half the margin since.

In a crystal (the model's cell and space group) atoms also meet symmetry mates: those contacts
are pairs (i, mate m) where mate m is R_m x_j + t_m, a copy of atom j placed by a space-group
operation and lattice translation found at build time.  Each contact is listed from both sides
with half weight: the energy per asymmetric unit is right, and each atom gets the whole force.
An atom within 1 Å of its own image sits on a special position and is not repelled by it;
partially occupied atoms whose occupancies (in the model the topology was built from) sum to at
most 1 are not repelled by each other's images (disorder across a symmetry element); nor are
the atoms of a link to a symmetry mate (1-2) and each of them and the other's bonded
neighbours (1-3).

Minimum distances: the sum of the two atoms' radii below (reduced van der Waals radii, so that
well-refined deposited structures have almost no violations), 2.6 Å between N/O atoms (they may
be hydrogen-bonded), 1.8 Å between a hydrogen and N/O; metal ions use a small radius since their
coordination distances are short.
"""
from dataclasses import dataclass

import gemmi
import numpy as np
import scipy.sparse
from scipy.spatial import cKDTree

from ..grid import space_group_operations, symmetry_contacts
from .topology import check_packing

RADII = {"H": 1.0, "C": 1.6, "N": 1.45, "O": 1.4, "S": 1.7, "P": 1.7, "SE": 1.8, "F": 1.35,
         "CL": 1.6, "BR": 1.7, "I": 1.85}
METAL_RADIUS = 0.6
OTHER_RADIUS = 1.5
POLAR = ("N", "O")
POLAR_PAIR_DMIN = 2.6
POLAR_H_DMIN = 1.8


@dataclass
class NonbondedSettings:
    enabled: bool = True
    sigma: float = 0.2            # Å; energy w (dmin - d)^2 with w = 1 / sigma^2
    one_four_factor: float = 0.8
    margin: float = 1.0           # Å added to the pair search radius
    clash_overlap: float = 0.4    # Å below dmin counted as an overlap in statistics
    symmetry: bool = True         # contacts with symmetry mates in a crystal
    special_position: float = 1.0  # Å: an atom this close to its own image is on a special position


def atom_radius(element):
    el = element.upper()
    if el in RADII:
        return RADII[el]
    return METAL_RADIUS if gemmi.Element(el).is_metal else OTHER_RADIUS


def _keys(i, j, n):
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    return lo.astype(np.int64) * n + hi


def _link_exclusions(links, adjacency, n):
    """Keys of the atom pairs (i, mate of j) not to repel across links (K, 2) to symmetry
    mates: the linked atoms, and each with the other's bonded neighbours."""
    keys = []
    for i, j in np.asarray(links, dtype=np.int64).reshape(-1, 2):
        ni, nj = adjacency[i].indices, adjacency[j].indices
        keys += [_keys(np.array([i]), np.array([j]), n), _keys(ni, np.full(len(ni), j), n),
                 _keys(np.full(len(nj), i), nj, n)]
    return np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)


class PairList:
    """Nonbonded pairs (R,2), their minimum distances (R,) and weights, for one topology."""

    def __init__(self, topology, settings=None):
        self.settings = settings or NonbondedSettings()
        self.topology = topology
        n = topology.n_atoms
        self.n_atoms = n
        self.element = np.array([e.upper() for e in topology.element])
        self.radius = np.array([atom_radius(e) for e in self.element])
        self.altloc = np.asarray(topology.altloc)
        self.occupancy = np.asarray(topology.occupancy, dtype=np.float64)
        # Atoms without a dictionary definition have no bonds to exclude them from their
        # neighbours, so they take no part in nonbonded repulsion either.
        self._unrestrained = np.zeros(n, dtype=bool)
        self._unrestrained[topology.unrestrained] = True
        # Bonds to a mate's image exclude pairs through symmetry_links instead.
        bonds = topology.bonds.atoms[(topology.bonds.atoms < n).all(axis=1)]
        ones = np.ones(len(bonds), dtype=np.int32)
        a = scipy.sparse.coo_matrix((ones, (bonds[:, 0], bonds[:, 1])), shape=(n, n)).tocsr()
        a = ((a + a.T) > 0).astype(np.int32)
        a2 = ((a @ a) > 0).astype(np.int32)
        a3 = (a2 @ a) > 0
        near = ((a + a2) > 0).tocoo()
        self._excluded = np.unique(_keys(near.row, near.col, n))
        far = a3.tocoo()
        self._one_four = np.setdiff1d(np.unique(_keys(far.row, far.col, n)), self._excluded)
        self._mate_excluded = _link_exclusions(topology.symmetry_links, a, n)
        self.max_dmin = 2 * float(self.radius.max()) if n else 0.0
        self.crystal = None   # (cell, fractional operations) where mates are searched
        if self.settings.symmetry and topology.cell is not None:
            self.crystal = (topology.cell, space_group_operations(topology.spacegroup))
        self.pairs = np.zeros((0, 2), np.int32)   # atom i, atom j or n_atoms + mate
        self.dmin = np.zeros(0)
        self.weight = np.zeros(0)                 # 1, or 1/2 for a contact with a mate
        self.mate_atom = np.zeros(0, np.int64)    # atom j of each mate
        self.mate_rot = np.zeros((0, 3, 3))       # Cartesian R of each mate
        self.mate_shift = np.zeros((0, 3))        # Cartesian t (Å) of each mate
        self.n_builds = 0

    def min_distance(self, i, j, mates=False):
        """Minimum allowed distance for atom pairs (i, j) (arrays); ``mates``: j is a symmetry
        mate (never 1-4 to i)."""
        ei, ej = self.element[i], self.element[j]
        dmin = self.radius[i] + self.radius[j]
        pi, pj = np.isin(ei, POLAR), np.isin(ej, POLAR)
        dmin = np.where(pi & pj, POLAR_PAIR_DMIN, dmin)
        dmin = np.where(((ei == "H") & pj) | ((ej == "H") & pi), POLAR_H_DMIN, dmin)
        if mates:
            return dmin
        one_four = np.isin(_keys(i, j, self.n_atoms), self._one_four)
        return np.where(one_four, dmin * self.settings.one_four_factor, dmin)

    def _allowed(self, i, j):
        """Pairs that may repel: not in different conformers, both atoms restrained."""
        alt_i, alt_j = self.altloc[i], self.altloc[j]
        keep = ~((alt_i != "") & (alt_j != "") & (alt_i != alt_j))
        return keep & ~(self._unrestrained[i] | self._unrestrained[j])

    def _mate_candidates(self, mean, radius):
        """Contacts of the mean model with symmetry mates within ``radius``: atoms i (P,) and
        mates (atom j (M,), Cartesian R (M,3,3) and t (M,3) placing it at R x_j + t), with the
        mate of each contact (P,).  A mate near several atoms is listed once."""
        found = list(symmetry_contacts(mean, *self.crystal, radius))
        if not found:
            return None
        i = np.concatenate([h[0] for h in found])
        j = np.concatenate([h[1] for h in found])
        d = np.concatenate([h[2] for h in found])
        # The image (operation and lattice shift) each contact's mate comes from.
        image_id = np.concatenate([np.full(len(h[0]), k) for k, h in enumerate(found)])
        # Partially occupied atoms whose occupancies sum to at most 1 exclude each other: a
        # molecule disordered across a symmetry element meets its own image only half the time.
        occ_i, occ_j = self.occupancy[i], self.occupancy[j]
        exclusive = (occ_i < 1) & (occ_j < 1) & (occ_i + occ_j <= 1 + 1e-3)
        keep = (self._allowed(i, j) & ~exclusive
                & ~((i == j) & (d < self.settings.special_position))
                & ~np.isin(_keys(i, j, self.n_atoms), self._mate_excluded))
        i, j, image_id = i[keep], j[keep], image_id[keep]
        _, first, mate = np.unique(image_id * self.n_atoms + j, return_index=True,
                                   return_inverse=True)
        rot = np.array([found[k][3] for k in image_id[first]]).reshape(-1, 3, 3)
        shift = np.array([found[k][4] for k in image_id[first]]).reshape(-1, 3)
        return i, (j[first], rot, shift), mate.ravel()

    def build(self, xyz, backend):
        """Pairs for every model of ``xyz`` (B,N,3), an array of ``backend``."""
        xp = backend.xp
        mean = backend.to_numpy(xyz.mean(axis=0)).astype(np.float64)
        spread = float(xp.sqrt(((xyz - xyz.mean(axis=0)) ** 2).sum(-1)).max()) if xyz.size else 0.0
        radius = self.max_dmin + self.settings.margin + 2 * spread
        tree = cKDTree(mean)
        check_packing(mean, radius, self.topology.label, self.topology.altloc)
        pairs = tree.query_pairs(radius, output_type="ndarray")
        i, j = pairs[:, 0], pairs[:, 1]
        keep = ~np.isin(_keys(i, j, self.n_atoms), self._excluded) & self._allowed(i, j)
        i, j = i[keep], j[keep]
        dmin = self.min_distance(i, j)
        weight = np.ones(len(i))
        n = self.n_atoms
        mates = self._mate_candidates(mean, radius) if self.crystal is not None else None
        rot, shift, mate_atom = np.zeros((0, 3, 3)), np.zeros((0, 3)), np.zeros(0, np.int64)
        if mates is not None:
            mi, (mate_atom, rot, shift), mate = mates
            i = np.concatenate([i, mi])
            j = np.concatenate([j, n + mate])
            dmin = np.concatenate([dmin, self.min_distance(mi, mate_atom[mate], mates=True)])
            weight = np.concatenate([weight, np.full(len(mi), 0.5)])
        ext = self.extend(xyz, backend, mate_atom, rot, shift)
        # Keep the pairs that some model has within dmin + margin: until an atom moves by half
        # the margin, no other pair can come closer than dmin.
        close = np.zeros(len(i), dtype=bool)
        chunk = max(1, 2 ** 26 // max(1, xyz.shape[0]))
        for lo in range(0, len(i), chunk):
            ii = backend.asarray(i[lo:lo + chunk], dtype=np.int64)
            jj = backend.asarray(j[lo:lo + chunk], dtype=np.int64)
            d2 = ((ext[:, ii] - ext[:, jj]) ** 2).sum(-1).min(axis=0)
            reach = backend.asarray(dmin[lo:lo + chunk] + self.settings.margin)
            close[lo:lo + chunk] = backend.to_numpy(d2 < reach ** 2)
        i, j, dmin, weight = i[close], j[close], dmin[close], weight[close]
        # Only the mates of kept contacts, renumbered in order.
        used = np.unique(j[j >= n]) - n
        if len(mate_atom):
            renumber = np.zeros(len(mate_atom), np.int64)
            renumber[used] = np.arange(len(used))
            j = np.where(j >= n, n + renumber[np.maximum(j - n, 0)], j)
        self.pairs = np.stack([i, j], axis=1).astype(np.int32)
        self.dmin, self.weight = dmin, weight
        self.mate_atom, self.mate_rot, self.mate_shift = mate_atom[used], rot[used], shift[used]
        self.n_builds += 1
        return self

    @staticmethod
    def extend(xyz, backend, mate_atom, rot, shift):
        """Coordinates (B, N + M, 3) of the atoms followed by the symmetry mates."""
        if not len(mate_atom):
            return xyz
        xp = backend.xp
        r = backend.asarray(rot, dtype=xyz.dtype)
        t = backend.asarray(shift, dtype=xyz.dtype)
        mates = xp.einsum("mij,bmj->bmi", r, xyz[:, backend.asarray(mate_atom)]) + t
        return xp.concatenate([xyz, mates], axis=1)

    @property
    def n_mates(self):
        return len(self.mate_atom)

    @property
    def allowed_move(self):
        """Largest displacement of any atom from the reference before a rebuild is due."""
        return 0.5 * self.settings.margin
