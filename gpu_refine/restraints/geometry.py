"""T_restraints for a batch: energies, gradients and per-restraint deviations on one backend.

``GeometryRestraints(topology)`` moves the topology's index arrays to the backend once; each
call then evaluates every restraint type for all B models with one kernel launch per type.
T = sum over types of sum_r w_r delta_r^2 with w_r = 1 / sigma_r^2 (restraints with sigma 0 are
counted but carry no weight).  Links to symmetry mates are restrained on images of the mates'
atoms (``Topology.mate_atom``), placed from the coordinates before each evaluation.
"""
import contextlib

import numpy as np

from ..backend import get_backend
from ..errors import ParameterError
from .nonbonded import NonbondedSettings, PairList

TYPES = ("bonds", "angles", "torsions", "chirals", "planes", "nonbonded")


def _weights(sigma):
    sigma = np.asarray(sigma, np.float64)
    return np.where(sigma > 0, 1.0 / np.where(sigma > 0, sigma, 1.0) ** 2, 0.0)


class GeometryRestraints:
    def __init__(self, topology, backend=None, dtype=np.float32, nonbonded=None):
        self.topology = topology
        self.backend = bk = get_backend(backend)
        self.dtype = np.dtype(dtype)
        self.nonbonded_settings = nonbonded if nonbonded is not None else NonbondedSettings()
        t = topology

        def arr(a, dt=None):
            return bk.asarray(np.asarray(a), dtype=dt or self.dtype)

        i32 = np.int32
        # type -> (kernel provider function, its arguments between xyz and energy)
        self._kernels = {
            "bonds": ("bond_terms", (arr(t.bonds.atoms, i32), arr(t.bonds.ideal),
                                     arr(_weights(t.bonds.sigma)))),
            "angles": ("angle_terms", (arr(t.angles.atoms, i32), arr(np.radians(t.angles.ideal)),
                                       arr(_weights(np.radians(t.angles.sigma))))),
            "torsions": ("torsion_terms", (arr(t.torsions.atoms, i32),
                                           arr(np.radians(t.torsions.ideal)),
                                           arr(_weights(np.radians(t.torsions.sigma))),
                                           arr(t.torsions.period, i32))),
            "chirals": ("chiral_terms", (arr(t.chirals.atoms, i32), arr(t.chirals.ideal),
                                         arr(_weights(t.chirals.sigma)),
                                         arr(t.chirals.sign, np.int8))),
            "planes": ("plane_terms", (arr(t.planes.ptr, i32), arr(t.planes.atoms, i32),
                                       arr(_weights(t.planes.sigma)))),
        }
        self.pairs = PairList(topology, self.nonbonded_settings)
        # Images that links to symmetry mates restrain (restraint atoms past n_atoms).
        self._images = None
        if topology.n_mates:
            self._images = (bk.asarray(topology.mate_atom, dtype=np.int64),
                            arr(topology.mate_rot), arr(topology.mate_shift))
        self._mates = None
        self._reference = None
        self._deferred = None    # _PairCheck while deferred_pair_checks holds

    @property
    def n_atoms(self):
        return self.topology.n_atoms

    def _check(self, xyz):
        xyz = self.backend.asarray(xyz, dtype=self.dtype)
        if xyz.ndim != 3 or xyz.shape[1:] != (self.n_atoms, 3):
            raise ParameterError(f"xyz must have shape (B, {self.n_atoms}, 3), got {xyz.shape}")
        return xyz

    @contextlib.contextmanager
    def deferred_pair_checks(self):
        """Within, an evaluation does not stop to ask whether some atom has moved too far
        for the pair list (a device→host sync each on a GPU): it leaves the answer on the
        device, and the caller (minimize_lbfgs's ``recheck``) fetches it with its own and
        repeats an evaluation made with a stale list after ``refresh()``."""
        self._deferred = _PairCheck()
        try:
            yield self._deferred
        finally:
            self._deferred = None

    def update_pairs(self, xyz, force=False):
        """Rebuild the nonbonded pair list if any atom moved more than allowed since the last
        build (or the batch size changed)."""
        ref = self._reference
        check = self._deferred
        force = force or (check is not None and check.due)
        if not force and ref is not None and ref.shape == xyz.shape:
            moved = self.backend.ops.moved_beyond(xyz, ref, self.pairs.allowed_move,
                                                  self.backend.xp.zeros((), np.int32))
            if check is not None:
                check.flag = moved
                return False
            if not int(moved):
                return False
        if check is not None:
            check.due, check.flag = False, None
        pl = self.pairs.build(xyz, self.backend)
        w = 1.0 / self.nonbonded_settings.sigma ** 2
        bk = self.backend
        self._kernels["nonbonded"] = ("nonbonded_terms", (
            bk.asarray(pl.pairs, dtype=np.int32),
            bk.asarray(pl.dmin, dtype=self.dtype),
            bk.asarray(w * pl.weight, dtype=self.dtype)))
        self._mates = None
        if pl.n_mates:
            self._mates = (bk.asarray(pl.mate_atom, dtype=np.int64),
                           bk.asarray(pl.mate_rot, dtype=self.dtype),
                           bk.asarray(pl.mate_shift, dtype=self.dtype))
        self._reference = xyz.copy()
        return True

    def _run(self, name, xyz, energy, grad, delta):
        function, args = self._kernels[name]
        if name == "nonbonded" and self._mates is not None:
            self._run_with_mates(args, xyz, energy, grad, delta)
            return
        getattr(self.backend.ops, function)(xyz, *args, energy, grad, delta)

    def _run_with_mates(self, args, xyz, energy, grad, delta):
        """Nonbonded terms on the atoms followed by their symmetry mates."""
        xp = self.backend.xp
        ext = self.pairs.extend(xyz, self.backend, *self._mates)
        g_ext = xp.zeros(ext.shape, dtype=grad.dtype)
        self.backend.ops.nonbonded_terms(ext, *args, energy, g_ext, delta)
        grad += self._fold(g_ext, self._mates)

    def _fold(self, g_ext, images):
        """Gradient (B,N,3) on the atoms given one (B,N+M,3) on the atoms followed by
        ``images`` (atom, R, t): an image's part returns to its atom through R^T (image =
        R x + t)."""
        xp = self.backend.xp
        atom, rot, _ = images
        n_models, n = g_ext.shape[0], self.n_atoms
        back = xp.einsum("mji,bmj->bmi", rot, g_ext[:, n:])
        flat = (xp.arange(n_models)[:, None] * n + atom[None, :]).ravel()
        total = g_ext[:, :n].reshape(-1, 3)
        for c in range(3):
            total[:, c] += xp.bincount(flat, weights=back[..., c].ravel(),
                                       minlength=n_models * n).astype(g_ext.dtype)
        return total.reshape(n_models, n, 3)

    def _bonded_frame(self, xyz):
        """Coordinates the bonded restraints see: the atoms, followed by the images that links
        to symmetry mates restrain, if any."""
        if self._images is None:
            return xyz
        return self.pairs.extend(xyz, self.backend, *self._images)

    def _n_deltas(self, name):
        _, args = self._kernels[name]
        return len(args[1] if name == "planes" else args[0])

    def _prepare(self, xyz):
        """Checked coordinates and the types to evaluate (pair list updated if due)."""
        xyz = self._check(xyz)
        if self.nonbonded_settings.enabled:
            self.update_pairs(xyz)
            return xyz, TYPES
        return xyz, TYPES[:-1]

    def _zeroed(self, shape):
        """(energy (B,) float64, gradient ``shape``) zeroed by one fill of one buffer (a
        launch each on a GPU otherwise)."""
        xp = self.backend.xp
        n = shape[0]
        buf = xp.zeros(8 * n + int(np.prod(shape)) * self.dtype.itemsize, dtype=np.uint8)
        return buf[:8 * n].view(np.float64), buf[8 * n:].view(self.dtype).reshape(shape)

    def energy_and_gradient(self, xyz):
        """(T (B,) float64, dT/dxyz (B,N,3)) summed over all restraint types."""
        xyz, types = self._prepare(xyz)
        energy, grad = self._zeroed(xyz.shape)
        xp = self.backend.xp
        ext = self._bonded_frame(xyz)
        g_ext = grad if ext is xyz else xp.zeros(ext.shape, dtype=self.dtype)
        for name in types:
            if name == "nonbonded":
                self._run(name, xyz, energy, grad, None)
            else:
                self._run(name, ext, energy, g_ext, None)
        if ext is not xyz:
            grad += self._fold(g_ext, self._images)
        return energy, grad

    def terms(self, xyz):
        """Per type: (energy (B,) float64, delta (B,R)) with deltas in Å, radians, Å³; for
        planes one delta per plane member; for nonbonded d - dmin per listed pair."""
        xyz, types = self._prepare(xyz)
        xp = self.backend.xp
        out = {}
        ext = self._bonded_frame(xyz)
        for name in types:
            x = xyz if name == "nonbonded" else ext
            n = self._n_deltas(name)
            energy = xp.zeros(xyz.shape[0], dtype=xp.float64)
            grad = xp.zeros(x.shape, dtype=self.dtype)
            delta = xp.zeros((xyz.shape[0], n), dtype=self.dtype)
            self._run(name, x, energy, grad, delta)
            out[name] = (energy, delta)
        return out


class _PairCheck:
    """The pair list's state under deferred checks: ``flag`` (a device 0-d int: nonzero where
    the last evaluation's list was stale, or None) and ``due`` (rebuild at the next
    evaluation)."""

    def __init__(self):
        self.flag = None
        self.due = False

    def stale(self):
        return self.flag

    def refresh(self):
        self.due = True
