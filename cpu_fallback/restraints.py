"""Batched restraint terms (twins of ``kernels/restraints.cu``).

Every function takes coordinates ``xyz`` (B,N,3), restraint index arrays shared by all models, and
*adds* to ``energy`` (B,) float64 and ``grad`` (B,N,3); ``delta`` (B,R), when given, receives the
per-restraint deviation.  The terms and sign conventions are written out in the ``.cu`` header.
"""
import numpy as np


def _scatter(grad, atoms, g):
    """grad[m, atoms[r]] += g[m, r] for every model m, without Python loops over restraints."""
    n_models, n_atoms, width = grad.shape
    flat = (np.arange(n_models)[:, None] * n_atoms + atoms[None, :]).ravel()
    g = g.reshape(-1, width)
    size = n_models * n_atoms
    add = np.stack([np.bincount(flat, weights=g[:, k], minlength=size) for k in range(width)],
                   axis=-1)
    grad += add.reshape(grad.shape).astype(grad.dtype)


def _finish(energy, delta, e, diff):
    energy += e.sum(axis=1)
    if delta is not None:
        delta[...] = diff


def _cross(a, b):
    return np.cross(a, b)


def _dot(a, b):
    return np.einsum("...k,...k->...", a, b)


def _pair_geometry(xyz, atoms):
    x = xyz.astype(np.float64)
    d = x[:, atoms[:, 0]] - x[:, atoms[:, 1]]
    return d, np.sqrt(_dot(d, d))


def bond_terms(xyz, atoms, ideal, weight, energy, grad, delta=None):
    """w (d - d0)^2 for atom pairs ``atoms`` (R,2)."""
    d, length = _pair_geometry(xyz, atoms)
    diff = length - ideal
    w = np.asarray(weight, np.float64)
    g = d * (2.0 * w * diff / np.maximum(length, 1e-12))[..., None]
    _scatter(grad, atoms[:, 0], g)
    _scatter(grad, atoms[:, 1], -g)
    _finish(energy, delta, w * diff * diff, diff)


def nonbonded_terms(xyz, atoms, dmin, weight, energy, grad, delta=None):
    """w (dmin - d)^2 for pairs closer than ``dmin``; delta = d - dmin for every pair."""
    d, length = _pair_geometry(xyz, atoms)
    diff = length - dmin
    close = diff < 0
    w = np.where(close, np.asarray(weight, np.float64), 0.0)
    g = d * (2.0 * w * diff / np.maximum(length, 1e-12))[..., None]
    _scatter(grad, atoms[:, 0], g)
    _scatter(grad, atoms[:, 1], -g)
    _finish(energy, delta, w * diff * diff, diff)


def _angle_and_grad(u, v):
    lu = np.sqrt(_dot(u, u))[..., None]
    lv = np.sqrt(_dot(v, v))[..., None]
    c = _cross(u, v)
    s = np.sqrt(_dot(c, c))[..., None]
    co = _dot(u, v)[..., None]
    theta = np.arctan2(s, co)[..., 0]
    sn = np.maximum(s / (lu * lv), 1e-12)
    cs = co / (lu * lv)
    uh, vh = u / lu, v / lv
    du = (uh * cs - vh) / (lu * sn)
    dv = (vh * cs - uh) / (lv * sn)
    return theta, du, dv


def angle_terms(xyz, atoms, ideal, weight, energy, grad, delta=None):
    """w (theta - theta0)^2 for atom triples ``atoms`` (R,3), angles in radians at the middle atom."""
    x = xyz.astype(np.float64)
    xj = x[:, atoms[:, 1]]
    theta, du, dv = _angle_and_grad(x[:, atoms[:, 0]] - xj, x[:, atoms[:, 2]] - xj)
    diff = theta - ideal
    w = np.asarray(weight, np.float64)
    f = (2.0 * w * diff)[..., None]
    _scatter(grad, atoms[:, 0], du * f)
    _scatter(grad, atoms[:, 2], dv * f)
    _scatter(grad, atoms[:, 1], -(du + dv) * f)
    _finish(energy, delta, w * diff * diff, diff)


def torsion_terms(xyz, atoms, ideal, weight, period, energy, grad, delta=None):
    """w wrap(phi - phi0)^2 for ``atoms`` (R,4); the difference wraps with 2 pi / period."""
    x = xyz.astype(np.float64)
    p0, p1, p2, p3 = (x[:, atoms[:, k]] for k in range(4))
    f, g, h = p0 - p1, p1 - p2, p3 - p2
    ca, cb = _cross(f, g), _cross(h, g)
    a2 = np.maximum(_dot(ca, ca), 1e-24)[..., None]
    b2 = np.maximum(_dot(cb, cb), 1e-24)[..., None]
    lg = np.sqrt(_dot(g, g))[..., None]
    phi = np.arctan2(_dot(_cross(cb, ca), g) / lg[..., 0], _dot(ca, cb))
    per = 2.0 * np.pi / np.maximum(1, period)
    diff = phi - ideal
    diff -= per * np.floor(diff / per + 0.5)
    w = np.asarray(weight, np.float64)
    k = (2.0 * w * diff)[..., None]
    g0 = -ca * lg / a2
    g3 = cb * lg / b2
    fg = _dot(f, g)[..., None] / lg ** 2
    hg = _dot(h, g)[..., None] / lg ** 2
    g1 = -g0 * (1.0 + fg) - g3 * hg
    g2 = g3 * (hg - 1.0) + g0 * fg
    for col, gk in enumerate((g0, g1, g2, g3)):
        _scatter(grad, atoms[:, col], gk * k)
    _finish(energy, delta, w * diff * diff, diff)


def chiral_terms(xyz, atoms, ideal, weight, sign, energy, grad, delta=None):
    """w (V - V0)^2 for (centre, a, b, c) in ``atoms`` (R,4); sign +1, -1 or 0 (either hand)."""
    x = xyz.astype(np.float64)
    pc = x[:, atoms[:, 0]]
    a, b, d = (x[:, atoms[:, k]] - pc for k in (1, 2, 3))
    bxd, dxa, axb = _cross(b, d), _cross(d, a), _cross(a, b)
    vol = _dot(a, bxd)
    sign = np.asarray(sign)
    target = np.where((sign < 0) | ((sign == 0) & (vol < 0)), -1.0, 1.0) * ideal
    diff = vol - target
    w = np.asarray(weight, np.float64)
    f = (2.0 * w * diff)[..., None]
    _scatter(grad, atoms[:, 1], bxd * f)
    _scatter(grad, atoms[:, 2], dxa * f)
    _scatter(grad, atoms[:, 3], axb * f)
    _scatter(grad, atoms[:, 0], -(bxd + dxa + axb) * f)
    _finish(energy, delta, w * diff * diff, diff)


def plane_terms(xyz, ptr, atoms, weight, energy, grad, delta=None):
    """sum_i w_i dist_i^2 to the weighted best plane; planes are ``atoms[ptr[p]:ptr[p+1]]``.

    ``delta`` has shape (B, len(atoms)): each member atom's signed distance.
    """
    ptr = np.asarray(ptr)
    n_planes = len(ptr) - 1
    if n_planes == 0:
        return
    owner = np.repeat(np.arange(n_planes), np.diff(ptr))
    w = np.asarray(weight, np.float64)
    x = xyz.astype(np.float64)[:, atoms]                                # (B,M,3)
    n_models = x.shape[0]
    wsum = np.bincount(owner, weights=w, minlength=n_planes)

    flat_owner = (np.arange(n_models)[:, None] * n_planes + owner[None, :]).ravel()

    def per_plane(values):                                              # (B,M,K) -> (B,P,K)
        flat = values.reshape(-1, values.shape[-1])
        sums = [np.bincount(flat_owner, weights=flat[:, k], minlength=n_models * n_planes)
                for k in range(flat.shape[1])]
        return np.stack(sums, axis=-1).reshape(n_models, n_planes, -1)

    centre = per_plane(x * w[:, None]) / wsum[:, None]
    d = x - centre[:, owner]
    pairs = [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]
    prods = np.stack([d[..., i] * d[..., j] for i, j in pairs], axis=-1) * w[:, None]
    s = per_plane(prods)
    cov = np.empty((n_models, n_planes, 3, 3))
    for k, (i, j) in enumerate(pairs):
        cov[..., i, j] = cov[..., j, i] = s[..., k]
    normal = np.linalg.eigh(cov)[1][..., :, 0]                          # smallest eigenvalue
    big = np.take_along_axis(normal, np.abs(normal).argmax(axis=-1)[..., None], axis=-1)
    normal = np.where(big < 0, -normal, normal)
    n_at = normal[:, owner]
    dist = _dot(n_at, d)
    _scatter(grad, atoms, n_at * (2.0 * w * dist)[..., None])
    energy += (w * dist * dist).sum(axis=1)
    if delta is not None:
        delta[...] = dist


def adp_similarity_terms(values, atoms, weight, energy, grad, delta=None):
    """w sum_k (v_ik - v_jk)^2 for atom pairs; ``values`` (B,N,K) with K = 1 (B) or 6 (U).

    ``grad`` has the shape of ``values``; delta = the Euclidean norm of the difference.
    """
    v = values.astype(np.float64)
    diff = v[:, atoms[:, 0]] - v[:, atoms[:, 1]]                        # (B,R,K)
    w = np.asarray(weight, np.float64)
    ss = _dot(diff, diff)
    g = diff * (2.0 * w)[:, None]
    _scatter(grad, atoms[:, 0], g)
    _scatter(grad, atoms[:, 1], -g)
    _finish(energy, delta, w * ss, np.sqrt(ss))


def moved_beyond(xyz, ref, allowed, out):
    """out (a 0-d int32 array) set to 1 where some atom of xyz (B,N,3) lies farther than
    ``allowed`` from its place in ref (the kernel only ever sets it: the caller zeroes it)."""
    d2 = ((xyz.astype(np.float64) - ref.astype(np.float64)) ** 2).sum(axis=-1)
    if (d2 > allowed * allowed).any():
        out[...] = 1
    return out
