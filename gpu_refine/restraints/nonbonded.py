"""Nonbonded repulsion: one pair list for a whole batch, rebuilt only when atoms have moved.

Pairs are all atom pairs closer than their minimum distance plus a margin, except 1-2 and 1-3
pairs (bonded, or bonded to a common atom), pairs of different alternative conformations and
atoms without a dictionary definition.  1-4 pairs are kept with their minimum distance scaled
by ``one_four_factor`` (as phenix's vdw_1_4_factor).  The list is the union over the models of
a batch: candidates come from a search around the batch mean with the radius grown by twice the
largest deviation from it; a candidate is kept when some model has it within dmin + margin.  It
is rebuilt when any atom of any model has moved more than half the margin since.

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


def atom_radius(element):
    el = element.upper()
    if el in RADII:
        return RADII[el]
    return METAL_RADIUS if gemmi.Element(el).is_metal else OTHER_RADIUS


def _keys(i, j, n):
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    return lo.astype(np.int64) * n + hi


class PairList:
    """Nonbonded pairs (R,2), their minimum distances (R,) and weights, for one topology."""

    def __init__(self, topology, settings=None):
        self.settings = settings or NonbondedSettings()
        n = topology.n_atoms
        self.n_atoms = n
        self.element = np.array([e.upper() for e in topology.element])
        self.radius = np.array([atom_radius(e) for e in self.element])
        self.altloc = np.asarray(topology.altloc)
        # Atoms without a dictionary definition have no bonds to exclude them from their
        # neighbours, so they take no part in nonbonded repulsion either.
        self._unrestrained = np.zeros(n, dtype=bool)
        self._unrestrained[topology.unrestrained] = True
        bonds = topology.bonds.atoms
        ones = np.ones(len(bonds), dtype=np.int32)
        a = scipy.sparse.coo_matrix((ones, (bonds[:, 0], bonds[:, 1])), shape=(n, n)).tocsr()
        a = ((a + a.T) > 0).astype(np.int32)
        a2 = ((a @ a) > 0).astype(np.int32)
        a3 = (a2 @ a) > 0
        near = ((a + a2) > 0).tocoo()
        self._excluded = np.unique(_keys(near.row, near.col, n))
        far = a3.tocoo()
        self._one_four = np.setdiff1d(np.unique(_keys(far.row, far.col, n)), self._excluded)
        self.max_dmin = 2 * float(self.radius.max()) if n else 0.0
        self.pairs = np.zeros((0, 2), np.int32)
        self.dmin = np.zeros(0)
        self.n_builds = 0

    def min_distance(self, i, j):
        """Minimum allowed distance for atom pairs (i, j) (arrays)."""
        ei, ej = self.element[i], self.element[j]
        dmin = self.radius[i] + self.radius[j]
        pi, pj = np.isin(ei, POLAR), np.isin(ej, POLAR)
        dmin = np.where(pi & pj, POLAR_PAIR_DMIN, dmin)
        dmin = np.where(((ei == "H") & pj) | ((ej == "H") & pi), POLAR_H_DMIN, dmin)
        one_four = np.isin(_keys(i, j, self.n_atoms), self._one_four)
        return np.where(one_four, dmin * self.settings.one_four_factor, dmin)

    def build(self, xyz, backend):
        """Pairs for every model of ``xyz`` (B,N,3), an array of ``backend``."""
        xp = backend.xp
        mean = backend.to_numpy(xyz.mean(axis=0)).astype(np.float64)
        spread = float(xp.sqrt(((xyz - xyz.mean(axis=0)) ** 2).sum(-1)).max()) if xyz.size else 0.0
        radius = self.max_dmin + self.settings.margin + 2 * spread
        pairs = cKDTree(mean).query_pairs(radius, output_type="ndarray")
        i, j = pairs[:, 0], pairs[:, 1]
        keep = ~np.isin(_keys(i, j, self.n_atoms), self._excluded)
        alt_i, alt_j = self.altloc[i], self.altloc[j]
        keep &= ~((alt_i != "") & (alt_j != "") & (alt_i != alt_j))
        keep &= ~(self._unrestrained[i] | self._unrestrained[j])
        i, j = i[keep], j[keep]
        dmin = self.min_distance(i, j)
        # Keep the pairs that some model has within dmin + margin: until an atom moves by half
        # the margin, no other pair can come closer than dmin.
        close = np.zeros(len(i), dtype=bool)
        chunk = max(1, 2 ** 26 // max(1, xyz.shape[0]))
        for lo in range(0, len(i), chunk):
            ii = backend.asarray(i[lo:lo + chunk], dtype=np.int64)
            jj = backend.asarray(j[lo:lo + chunk], dtype=np.int64)
            d2 = ((xyz[:, ii] - xyz[:, jj]) ** 2).sum(-1).min(axis=0)
            reach = backend.asarray(dmin[lo:lo + chunk] + self.settings.margin)
            close[lo:lo + chunk] = backend.to_numpy(d2 < reach ** 2)
        self.pairs = np.stack([i[close], j[close]], axis=1).astype(np.int32)
        self.dmin = dmin[close]
        self.n_builds += 1
        return self

    @property
    def allowed_move(self):
        """Largest displacement of any atom from the reference before a rebuild is due."""
        return 0.5 * self.settings.margin
