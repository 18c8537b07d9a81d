"""A change of variables for the sites that lets L-BFGS move whole stretches of chain at once.

The restraints make the sites' problem stiff: a bond resists a change of its length ~10⁴ times
more than the map resists a shift of a residue, so steepest-descent-like first steps (and an
L-BFGS history of 10-25 pairs) move atoms one at a time and a coherent displacement of a loop
takes hundreds of iterations (2AXD at 3 Å: ~800 to come within 0.25 Å of the map's model).
With M = C Cᵀ a fixed approximation of the restraints' Hessian, the minimiser works on z where
x = x0 + C⁻ᵀ z; the restraints' stiff directions are then as cheap as their soft ones.

M is the graph Laplacian of the bonds (curvature 2/σ² along each) and of the 1-3 pairs of the
angles (springs of ANGLE_SIGMA), plus SHIFT × I for the directions the restraints leave free
(rigid-body moves, unbonded atoms); the same for x, y and z.  Its atoms are put in reverse
Cuthill-McKee order, where a protein's M is banded (~10-40 wide), and factored once per
topology by banded Cholesky; each evaluation then costs two banded triangular solves
(``ops.banded_solve``) with the 3B coordinates of the batch as right-hand sides.
"""
import logging

import numpy as np
from scipy import sparse
from scipy.linalg import cholesky_banded
from scipy.sparse.csgraph import reverse_cuthill_mckee

log = logging.getLogger(__name__)

# A 1-3 spring as stiff as a ~3° angle restraint between 1.5 Å bonds.
ANGLE_SIGMA = 0.04
# Å⁻²: the curvature given to directions the restraints do not hold.  On 2AXD at 3 Å, 10-100
# converged alike (bench/RESULTS.md); far below the bonds' ~5000, so a segment's collective
# move is ~100× cheaper than in x.
SHIFT = 30.0
# A band wider than this many entries (n × (k+1)) is not factored: sites are refined in x.
MAX_BAND_ENTRIES = 50_000_000


def restraint_laplacian(topology, shift=SHIFT):
    """M (N, N), scipy CSR: the weighted graph Laplacian of the bonds and 1-3 angle pairs of
    ``topology`` plus ``shift`` on the diagonal.  Links to symmetry mates are left out (an
    image moves with its atom, not with its partner)."""
    n = topology.n_atoms
    bonds, sigma = topology.bonds.atoms, np.asarray(topology.bonds.sigma, np.float64)
    keep = (bonds < n).all(axis=1) & (sigma > 0)
    ends = topology.angles.atoms[:, [0, 2]].reshape(-1, 2)
    ends = ends[(ends < n).all(axis=1)]
    p = np.concatenate([bonds[keep].reshape(-1, 2), ends]).astype(np.int64)
    w = np.concatenate([2.0 / sigma[keep] ** 2, np.full(len(ends), 2.0 / ANGLE_SIGMA ** 2)])
    distinct = p[:, 0] != p[:, 1]
    p, w = p[distinct], w[distinct]
    off = sparse.coo_matrix((-w, (p[:, 0], p[:, 1])), shape=(n, n)).tocsr()
    off = off + off.T
    degree = -np.asarray(off.sum(axis=1)).ravel()
    return (off + sparse.diags(degree + shift)).tocsr()


def banded_cholesky(matrix):
    """(order, L in lower band storage (k+1, N)) with L Lᵀ = M[order][:, order] for the
    symmetric positive-definite sparse ``matrix``; None where its band is too wide."""
    n = matrix.shape[0]
    order = reverse_cuthill_mckee(matrix.tocsr(), symmetric_mode=True).astype(np.int64)
    m = matrix.tocsr()[order][:, order].tocoo()
    k = int(np.abs(m.row - m.col).max()) if m.nnz else 0
    if (k + 1) * n > MAX_BAND_ENTRIES:
        return None
    band = np.zeros((k + 1, n))
    lower = m.row >= m.col
    band[(m.row - m.col)[lower], m.col[lower]] = m.data[lower]
    return order, cholesky_banded(band, lower=True)


class SitesPreconditioner:
    """x = x0 + C⁻ᵀ z for the sites of a batch of ``topology`` (see the module's text).

    ``wrap(fg, x0)`` gives the objective of z, where the minimiser then runs from z = 0,
    and the map back to x.  None of it depends on the coordinates: one per run."""

    def __init__(self, topology, backend, shift=SHIFT):
        self.backend = backend
        self.n = topology.n_atoms
        factor = banded_cholesky(restraint_laplacian(topology, shift))
        if factor is None:
            raise ValueError("the restraints' band is too wide to factor")
        order, band = factor
        self.bandwidth = band.shape[0] - 1
        self.order = backend.asarray(order, dtype=np.int32)
        self.band = backend.asarray(band, dtype=np.float64)
        self.shift_value = shift

    def gradient(self, g):
        """∂f/∂z (B, 3N) = C⁻¹ ∂f/∂x for ``g`` = ∂f/∂x (B, N, 3); z's atoms in the factor's
        order."""
        out = self.backend.xp.empty_like(g)
        self.backend.ops.banded_solve(self.band, g, False, out, rhs_rows=self.order)
        return out.reshape(g.shape[0], -1)

    def step(self, z):
        """x - x0 (B, N, 3) = C⁻ᵀ z for ``z`` (B, 3N)."""
        z = z.reshape(z.shape[0], self.n, 3)
        out = self.backend.xp.empty_like(z)
        return self.backend.ops.banded_solve(self.band, z, True, out, out_rows=self.order)

    def wrap(self, fg, x0):
        """(fg_z, z0, x_of): ``fg_z(z) -> (f, ∂f/∂z)`` for ``fg(x) -> (f, ∂f/∂x)`` of the
        flattened sites (B, 3N), its start z0 = 0 and ``x_of(z)`` (B, 3N)."""
        shape = (x0.shape[0], self.n, 3)

        def x_of(z):
            return x0 + self.step(z).reshape(x0.shape).astype(x0.dtype, copy=False)

        def fg_z(z):
            f, g = fg(x_of(z))
            return f, self.gradient(g.reshape(shape)).astype(z.dtype, copy=False)
        return fg_z, self.backend.xp.zeros_like(x0), x_of
