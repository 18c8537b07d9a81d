"""Rigid-body parameters for a batch: each group of atoms (a chain, a selection) moves as one.

For group k with centre c_k (of its atoms at x0) and parameters (ω_k, t_k), a rotation vector
(radians) and a translation (Å):
    x_i = c_k + R(ω_k) (x0_i - c_k) + t_k
``RigidBodies(groups, x0, xp).wrap(fg)`` turns an objective of the sites (B, 3N) into one of
the (B, 6K) rigid-body parameters, so the same batched L-BFGS refines them.  ∂f/∂t_k is the
sum of the atoms' gradients; ∂f/∂ω_k = Σ_i g_i · (∂R/∂ω_k)(x0_i - c_k), with ∂R/∂ω from
central differences of Rodrigues' formula (3×3 matrices per group: exact to ~1e-10).
Written once with ``xp``.
"""
import numpy as np

_H = 1e-6   # radians: the step of R's central differences


def rotation_matrices(xp, omega):
    """R (…, 3, 3) of rotation vectors ``omega`` (…, 3) (Rodrigues), float64."""
    omega = omega.astype(xp.float64)
    theta = xp.sqrt((omega ** 2).sum(axis=-1))[..., None, None]
    k = xp.zeros(omega.shape[:-1] + (3, 3))
    k[..., 0, 1], k[..., 0, 2], k[..., 1, 2] = -omega[..., 2], omega[..., 1], -omega[..., 0]
    k = k - xp.swapaxes(k, -1, -2)
    small = theta < 1e-8
    safe = xp.where(small, 1.0, theta)
    a = xp.where(small, 1.0 - theta ** 2 / 6, xp.sin(safe) / safe)
    b = xp.where(small, 0.5 - theta ** 2 / 24, (1 - xp.cos(safe)) / safe ** 2)
    return xp.eye(3) + a * k + b * (k @ k)


class RigidBodies:
    """Groups ``group`` (N,) int (0 … K-1: the group of each atom) of the batch ``x0`` (B, N, 3)."""

    def __init__(self, group, x0, xp):
        self.xp = xp
        group = np.asarray(group)
        self.n_groups = int(group.max()) + 1 if group.size else 0
        self.group = xp.asarray(group)
        # (K, N) membership: sums over each group's atoms are one matrix product.
        self.members = xp.asarray((group[None, :] == np.arange(self.n_groups)[:, None])
                                  .astype(np.float64))
        count = np.bincount(group, minlength=self.n_groups).astype(np.float64)
        self.x0 = x0.astype(xp.float64)
        sums = xp.stack([self._sum_over_groups(self.x0[..., a]) for a in range(3)], axis=-1)
        self.centre = sums / xp.asarray(count)[None, :, None]        # (B, K, 3)
        self.d = self.x0 - self.centre[:, self.group]                 # (B, N, 3)

    def _sum_over_groups(self, v):
        """(B, K) sums of ``v`` (B, N) over each group's atoms."""
        return v @ self.members.T

    def sites(self, p):
        """x (B, N, 3) for parameters ``p`` (B, 6K): (ω, t) of each group."""
        p = p.reshape(p.shape[0], self.n_groups, 6).astype(self.xp.float64)
        r = rotation_matrices(self.xp, p[..., :3])[:, self.group]      # (B, N, 3, 3)
        moved = (r @ self.d[..., None])[..., 0]
        return self.centre[:, self.group] + moved + p[:, self.group, 3:]

    def gradient(self, p, g):
        """∂f/∂p (B, 6K) from ∂f/∂x ``g`` (B, N, 3) at parameters ``p``."""
        xp = self.xp
        p = p.reshape(p.shape[0], self.n_groups, 6).astype(xp.float64)
        g = g.astype(xp.float64)
        out = xp.zeros(p.shape)
        for a in range(3):
            out[..., 3 + a] = self._sum_over_groups(g[..., a])
            e = xp.zeros(3)
            e[a] = _H
            dr = (rotation_matrices(xp, p[..., :3] + e)
                  - rotation_matrices(xp, p[..., :3] - e)) / (2 * _H)   # (B, K, 3, 3)
            dx = (dr[:, self.group] @ self.d[..., None])[..., 0]
            out[..., a] = self._sum_over_groups((g * dx).sum(axis=-1))
        return out.reshape(p.shape[0], -1)

    def wrap(self, fg, dtype):
        """(fg_p, p0, x_of) for ``fg(x) -> (f, ∂f/∂x)`` of the flattened sites (B, 3N)."""
        xp = self.xp
        b, n = self.x0.shape[:2]

        def x_of(p):
            return self.sites(p).reshape(b, -1).astype(dtype)

        def fg_p(p):
            f, g = fg(x_of(p))
            return f, self.gradient(p, g.reshape(b, n, 3))
        return fg_p, xp.zeros((b, 6 * self.n_groups)), x_of
