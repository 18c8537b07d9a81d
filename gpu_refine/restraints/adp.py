"""ADP restraints for a batch: B similarity between bonded atoms, anisotropic U towards a sphere.

    T_adp = sum_bonds w_s |v_i - v_j|^2 + sum_aniso atoms w_p |U - U_eq I|_F^2
v = B (isotropic, Å²) or the six U components (anisotropic, Å²; only pairs of two anisotropic
atoms); w_s = 1 / sigma_b^2 (sigma in U for U: sigma_b / 8 pi^2); w_p = 1 / sigma_sphere^2.
"""
from dataclasses import dataclass

import numpy as np

from ..backend import get_backend

EIGHT_PI2 = 8 * np.pi ** 2


@dataclass
class ADPSettings:
    sigma_b: float = 10.0        # Å², allowed B difference between bonded atoms
    sigma_sphere: float = 0.05   # Å² (in U), allowed departure of U from isotropy


class ADPRestraints:
    def __init__(self, topology, backend=None, dtype=np.float32, settings=None, is_aniso=None):
        self.backend = bk = get_backend(backend)
        self.dtype = np.dtype(dtype)
        self.settings = s = settings or ADPSettings()
        n, atoms = topology.n_atoms, topology.bonds.atoms
        # An image's B is its atom's: a link to a symmetry mate restrains B across it too
        # (bar a link to the atom's own image).  U would need the image's rotation: U pairs
        # keep to the model's own bonds.
        real = np.concatenate([np.arange(n), topology.mate_atom])[atoms]
        real = np.sort(real, axis=1)
        pairs = np.unique(real[real[:, 0] != real[:, 1]], axis=0).reshape(-1, 2)
        self.pairs = bk.asarray(pairs, dtype=np.int32)
        self._w_b = bk.asarray(np.full(len(pairs), 1.0 / s.sigma_b ** 2), dtype=self.dtype)
        aniso = np.zeros(n, bool) if is_aniso is None else np.asarray(is_aniso)
        own = np.unique(np.sort(atoms[(atoms < n).all(axis=1)], axis=1), axis=0).reshape(-1, 2)
        both = aniso[own[:, 0]] & aniso[own[:, 1]] if len(own) else np.zeros(0, bool)
        self.u_pairs = bk.asarray(own[both], dtype=np.int32)
        w_u = 1.0 / (s.sigma_b / EIGHT_PI2) ** 2
        self._w_u = bk.asarray(np.full(int(both.sum()), w_u), dtype=self.dtype)
        self.aniso = bk.asarray(aniso, dtype=self.dtype)

    def b_energy_and_gradient(self, b):
        """(T (B,) float64, dT/dB (B,N)) for isotropic B (B,N)."""
        bk, xp = self.backend, self.backend.xp
        b = bk.asarray(b, dtype=self.dtype)
        energy = xp.zeros(b.shape[0], xp.float64)
        grad = xp.zeros(b.shape + (1,), self.dtype)
        bk.ops.adp_similarity_terms(b[..., None], self.pairs, self._w_b, energy, grad)
        return energy, grad[..., 0]

    def u_energy_and_gradient(self, u):
        """(T (B,) float64, dT/dU (B,N,6)) for U (B,N,6) = U11 U22 U33 U12 U13 U23."""
        bk, xp = self.backend, self.backend.xp
        u = bk.asarray(u, dtype=self.dtype)
        energy = xp.zeros(u.shape[0], xp.float64)
        grad = xp.zeros(u.shape, self.dtype)
        bk.ops.adp_similarity_terms(u, self.u_pairs, self._w_u, energy, grad)
        w = 1.0 / self.settings.sigma_sphere ** 2
        u64 = u.astype(xp.float64) * self.aniso[:, None]
        ueq = u64[..., :3].mean(axis=-1, keepdims=True)
        diag = u64[..., :3] - ueq
        off = u64[..., 3:]
        energy += w * ((diag ** 2).sum(axis=(1, 2)) + 2 * (off ** 2).sum(axis=(1, 2)))
        grad += (w * xp.concatenate([2 * diag, 4 * off], axis=-1)).astype(self.dtype)
        return energy, grad
