"""Map values and Cartesian gradients at atom positions (twin of ``kernels/interpolate.cu``)."""
import numpy as np

from .density import periodic_axes


def _weights(u, order):
    """Interpolation weights and their derivatives for the 4 points base-1 .. base+2."""
    if order == 3:
        u2, u3 = u * u, u * u * u
        w = np.stack([-0.5 * u3 + u2 - 0.5 * u, 1.5 * u3 - 2.5 * u2 + 1.0,
                      -1.5 * u3 + 2.0 * u2 + 0.5 * u, 0.5 * u3 - 0.5 * u2], axis=-1)
        dw = np.stack([-1.5 * u2 + 2.0 * u - 0.5, 4.5 * u2 - 5.0 * u,
                       -4.5 * u2 + 4.0 * u + 0.5, 1.5 * u2 - u], axis=-1)
    else:
        z = np.zeros_like(u)
        w = np.stack([z, 1.0 - u, u, z], axis=-1)
        dw = np.stack([z, -np.ones_like(u), np.ones_like(u), z], axis=-1)
    return w, dw


def interpolate_at_atoms(maps, map_index, xyz, geom, periodic, order, out=None):
    """Values (B,N) and d value / d xyz (B,N,3) of map ``map_index[m]`` at the atoms of model m.

    maps (M,n0,n1,n2); map_index (B,) int; xyz (B,N,3); geom (21,) and periodic as for
    spread_density;
    order 1 (trilinear) or 3 (Catmull-Rom tricubic); out: optional (values, grad) to fill.
    """
    frac_m = geom[:9].reshape(3, 3)
    g = (xyz.astype(np.float64) - geom[18:21]) @ frac_m.T              # (B,N,3)
    base = np.floor(g)
    w, dw = _weights(g - base, order)                                   # (B,N,3,4)
    n = np.asarray(maps.shape[1:])
    idx = base.astype(np.int64)[..., None] + np.arange(-1, 3)          # (B,N,3,4)
    wrap = periodic_axes(periodic)[:, None]
    idx = np.where(wrap, idx % n[:, None], np.clip(idx, 0, (n - 1)[:, None]))
    m = np.asarray(map_index)[:, None, None, None, None]
    vals = maps[m, idx[..., 0, :, None, None], idx[..., 1, None, :, None],
                idx[..., 2, None, None, :]].astype(np.float64)          # (B,N,4,4,4)
    value = np.einsum("mni,mnj,mnk,mnijk->mn", w[..., 0, :], w[..., 1, :], w[..., 2, :], vals)
    gi = np.einsum("mni,mnj,mnk,mnijk->mn", dw[..., 0, :], w[..., 1, :], w[..., 2, :], vals)
    gj = np.einsum("mni,mnj,mnk,mnijk->mn", w[..., 0, :], dw[..., 1, :], w[..., 2, :], vals)
    gk = np.einsum("mni,mnj,mnk,mnijk->mn", w[..., 0, :], w[..., 1, :], dw[..., 2, :], vals)
    grad = np.stack([gi, gj, gk], axis=-1) @ frac_m
    if out is None:
        return value.astype(xyz.dtype), grad.astype(xyz.dtype)
    out[0][...] = value
    out[1][...] = grad
    return out
