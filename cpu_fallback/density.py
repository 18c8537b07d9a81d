"""Batched atomic density on a grid and its adjoint (twin of ``kernels/density.cu``).

Arguments shared by both functions (B models, N atoms, T scattering types, G = 5 Gaussians):

xyz (B,N,3), b (B,N), u (B,N,6) or None, is_aniso (N,) bool or None, occ (B,N),
stype (N,) int, coefs (T,2,G) float64 [a; b], radius (B,N) in Å,
geom (21,) float64: index_from_xyz (3x3), xyz_from_index (3x3), origin (3),
blur (Å²), periodic: one bool for every axis or one per axis (3,) — where the grid wraps
around (the kernels take it as a bit mask).

Where the kernel loops over the points around each atom, NumPy works on a padded copy of each
model's grid so that every (atom, point) pair has a flat index ``base[atom] + offset[k]``; the
squared distances come from one matrix product, and a periodic grid folds its padding back.

For isotropic atoms on a grid with one index axis a perpendicular to the other two (b, c) —
every cell but a triclinic one: cryo-EM boxes, orthogonal, monoclinic, hexagonal cells — each
Gaussian factorises as exp(-k d²) = exp(-k G_aa δa²) · exp(-k Q(δb, δc)), with δ the offset in
grid steps, G the grid's metric and Q its (b, c) part; the plane factor is itself an outer
product of per-axis factors where b and c are perpendicular too.  So the density of an atom's
box is a product of a line and a plane factor, and the sums of the adjoint are contractions
with them (``_boxes``); the same points (d² < r²) take part, so the values are the same.  The
chunks of atoms of one model run on worker threads (one per core).
"""
import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

NGAUSS = 5
_FOUR_PI2 = 4.0 * np.pi**2
_PAIRS_PER_CHUNK = 1 << 21


def _worker_count():
    """GPU_REFINE_THREADS if set, else the cores this process may use (at most 16)."""
    value = os.environ.get("GPU_REFINE_THREADS", "").strip()
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            logging.getLogger(__name__).warning(
                "GPU_REFINE_THREADS=%r is not a number of threads; using one per core", value)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(16, cores or 1))


_WORKERS = _worker_count()


def _atom_shapes(b, u, is_aniso, stype, coefs, blur):
    """Per (model, atom) and Gaussian: amplitude, exponent k = 4pi²/Bt, Bt; for anisotropic atoms
    the inverse of Bm = 8pi² U + (b_g + blur) I and a flag."""
    a = coefs[stype, 0][None]                      # (1,N,G)
    bg = coefs[stype, 1][None]
    bt = bg + b[..., None].astype(np.float64) + blur
    shapes = {"amp": a * (4 * np.pi / bt) ** 1.5, "k": _FOUR_PI2 / bt, "bt": bt, "s": None,
              "aniso": np.zeros(b.shape, dtype=bool)}
    if u is not None and is_aniso is not None and np.any(is_aniso):
        m = np.zeros(b.shape + (NGAUSS, 3, 3))
        uu = 8 * np.pi**2 * u.astype(np.float64)[..., None, :]
        iso = np.broadcast_to(bg + blur, b.shape + (NGAUSS,))
        m[..., 0, 0] = uu[..., 0] + iso
        m[..., 1, 1] = uu[..., 1] + iso
        m[..., 2, 2] = uu[..., 2] + iso
        m[..., 0, 1] = m[..., 1, 0] = uu[..., 3]
        m[..., 0, 2] = m[..., 2, 0] = uu[..., 4]
        m[..., 1, 2] = m[..., 2, 1] = uu[..., 5]
        flag = np.broadcast_to(np.asarray(is_aniso, dtype=bool)[None, :], b.shape)
        m[~flag] = np.eye(3)
        shapes["s"] = np.linalg.inv(m)
        amp_aniso = a * (4 * np.pi) ** 1.5 / np.sqrt(np.linalg.det(m))
        shapes["amp"] = np.where(flag[..., None], amp_aniso, shapes["amp"])
        shapes["aniso"] = flag
    return shapes


def periodic_axes(periodic):
    """``periodic`` (one bool, or one per grid axis) as a (3,) bool array."""
    axes = np.broadcast_to(np.asarray(periodic, dtype=bool), (3,))
    return axes.copy()


def _real(xyz):
    """The working precision of the kernels: that of the coordinates (float32 or float64)."""
    return np.float32 if xyz.dtype == np.float32 else np.float64


def _model_rows(shapes, m, *keys):
    """Rows (N,G) of model m for ``keys`` of the atom shapes (one row may serve all models)."""
    return tuple(shapes[k][m if shapes[k].shape[0] > 1 else 0] for k in keys)


def _wrap_runs(length, n, pad):
    """(source, destination) slices that put padded indices 0..length-1 of a periodic axis
    (index i is grid point (i - pad) mod n) onto the n points, one contiguous run each."""
    runs, i = [], 0
    while i < length:
        g = (i - pad) % n
        run = min(n - g, length - i)
        runs.append((slice(i, i + run), slice(g, g + run)))
        i += run
    return runs


class _PaddedGrid:
    """One model's grid padded so that every atom's bounding box lies inside it; ``periodic``
    (3,) says which axes fold their padding back."""

    def __init__(self, shape, pad, periodic):
        self.n = np.asarray(shape, dtype=np.int64)
        self.pad = pad
        self.periodic = periodic
        self.shape = tuple(self.n + 2 * pad)
        self.strides = np.array([self.shape[1] * self.shape[2], self.shape[2], 1], dtype=np.int64)

    def fold(self, acc):
        """Sum the padded accumulator back onto the stored grid."""
        acc = acc.reshape(self.shape)
        n, p = [int(x) for x in self.n], [int(x) for x in self.pad]
        if not self.periodic.any():
            return acc[p[0]:p[0] + n[0], p[1]:p[1] + n[1], p[2]:p[2] + n[2]]
        # One pass: every block of the padded grid that maps onto one contiguous block.
        out = np.zeros(tuple(n))
        runs = [_wrap_runs(acc.shape[a], n[a], p[a]) if self.periodic[a]
                else [(slice(p[a], p[a] + n[a]), slice(0, n[a]))] for a in range(3)]
        for s0, d0 in runs[0]:
            for s1, d1 in runs[1]:
                for s2, d2 in runs[2]:
                    out[d0, d1, d2] += acc[s0, s1, s2]
        return out

    def expand(self, grid):
        """The padded copy of a stored grid (wrapped along periodic axes, zeros past a box's
        faces)."""
        wrap = [(int(p), int(p)) if w else (0, 0) for p, w in zip(self.pad, self.periodic)]
        zero = [(0, 0) if w else (int(p), int(p)) for p, w in zip(self.pad, self.periodic)]
        return np.pad(np.pad(grid, wrap, mode="wrap"), zero, mode="constant")


class _Offsets:
    """Displacement vectors d = point - atom of a chunk's pairs, built only when needed."""

    def __init__(self, dbase, doff, ci, ki):
        self._parts = (dbase, doff, ci, ki)
        self._d = None

    @property
    def d(self):
        if self._d is None:
            dbase, doff, ci, ki = self._parts
            self._d = dbase[ci] + doff[ki]
        return self._d


def _atom_boxes(xyz_m, radius_m, geom, shape, periodic, reach=1):
    """Grid coordinates g and box corners lo of the atoms whose sphere touches the grid (along
    its periodic axes every atom does), their radii, index steps per Å along each axis, padded
    grid.

    The padding covers ``reach`` radii beyond the grid (plus one point each): 1 holds every
    point of an atom's sphere, 2 every point of its whole box."""
    frac_m = geom[:9].reshape(3, 3)
    n = np.asarray(shape, dtype=np.int64)
    r = radius_m.astype(np.float64)
    g = (xyz_m.astype(np.float64) - geom[18:21]) @ frac_m.T
    wrap = periodic_axes(periodic)
    g = np.where(wrap, g - np.floor(g / n) * n, g)   # the same point of the periodic lattice
    rn = np.sqrt((frac_m**2).sum(axis=1))
    half = r[:, None] * rn[None, :]
    lo = np.ceil(g - half).astype(np.int64)
    hi = np.floor(g + half).astype(np.int64)
    atoms = np.arange(len(g))
    if not wrap.all():
        touches = np.all(((hi >= 0) & (lo < n)) | wrap, axis=1)
        atoms, g, lo, r = atoms[touches], g[touches], lo[touches], r[touches]
    rmax = float(r.max()) if len(r) else 0.0
    grid = _PaddedGrid(shape, np.ceil(reach * rmax * rn).astype(np.int64) + reach, wrap)
    return atoms, g, lo, r, rn, grid


def _pairs(xyz_m, radius_m, geom, shape, periodic):
    """For one model: the padded grid and chunks of (atom, offsets, d2 (P,), flat point).

    Distances are computed in the precision of xyz (float32 or float64), as the kernel's inputs.
    """
    orth_m = geom[9:18].reshape(3, 3)
    atoms, g, lo, r, rn, grid = _atom_boxes(xyz_m, radius_m, geom, shape, periodic)
    if not len(atoms):
        return grid, []
    rmax = float(r.max())
    # Offsets of every point of the largest sphere, relative to the box corner lo.
    ext = np.ceil(2 * rmax * rn).astype(np.int64) + 1
    offs = np.indices(ext).reshape(3, -1).T
    real = _real(xyz_m)
    doff = (offs @ orth_m.T).astype(real)                         # (K,3) Å
    doff2 = (doff * doff).sum(1)
    off_lin = offs @ grid.strides
    dbase = ((lo - g) @ orth_m.T).astype(real)                    # (A,3) Å
    base_lin = (lo + grid.pad) @ grid.strides
    chunk = max(1, _PAIRS_PER_CHUNK // len(offs))

    def chunks():
        for s in range(0, len(atoms), chunk):
            db = dbase[s:s + chunk]
            d2 = (db * db).sum(1)[:, None] + doff2[None, :] + 2 * db @ doff.T
            ci, ki = np.nonzero(d2 < (r[s:s + chunk] ** 2).astype(real)[:, None])
            yield (atoms[s + ci], _Offsets(db, doff, ci, ki), d2[ci, ki],
                   base_lin[s + ci] + off_lin[ki])

    return grid, chunks()


class _Factorisation:
    """A grid whose index axis ``perm[0]`` is perpendicular to the other two: axes in the order
    ``perm`` (a, b, c), the metric ``gp`` (Å² per grid step², in that order), ``mp`` the xyz of
    one step along each, and whether b and c are perpendicular too."""

    def __init__(self, perm, metric, orth):
        self.perm = perm
        self.gp = metric[np.ix_(perm, perm)]
        self.mp = orth[:, perm]
        self.plane_separable = self.gp[1, 2] == 0.0


def _factorisation(geom):
    """The _Factorisation of the grid, or None where no index axis is perpendicular to both
    others (a triclinic cell)."""
    orth = geom[9:18].reshape(3, 3)
    metric = orth.T @ orth
    tiny = 1e-12 * np.abs(np.diag(metric)).max()
    metric = np.where(np.abs(metric) <= tiny, 0.0, metric)
    for a in range(3):
        b, c = (x for x in range(3) if x != a)
        if metric[a, b] == 0.0 and metric[a, c] == 0.0:
            return _Factorisation([a, b, c], metric, orth)
    return None


def _boxes(xyz_m, radius_m, geom, shape, periodic, fac):
    """For one model on a factorisable grid (``fac``): the padded grid and a list of chunks, each
    a callable returning (atoms (A,), [δa, δb, δc] (A,e_axis) offsets from the atom in grid
    steps, axes in fac.perm's order, Q(δb, δc) (A,e_b,e_c) Å², inside (A,e_a*e_b*e_c) bool,
    flat points (A,e_a*e_b*e_c)), the box in (a, b, c) order, over the same boxes and points
    as ``_pairs``; built when called, on the worker thread that uses it."""
    real = _real(xyz_m)
    perm, gp = fac.perm, fac.gp.astype(real)
    atoms, g, lo, r, rn, grid = _atom_boxes(xyz_m, radius_m, geom, shape, periodic, reach=2)
    if not len(atoms):
        return grid, []
    base_lin = (lo + grid.pad) @ grid.strides
    # Atoms are grouped by box size, so that one atom of high B does not enlarge every box.
    ext_atom = np.ceil(2 * r[:, None] * rn[None, :]).astype(np.int64) + 1
    key = (ext_atom[:, 0] << 40) | (ext_atom[:, 1] << 20) | ext_atom[:, 2]
    _, first, group = np.unique(key, return_index=True, return_inverse=True)
    sizes = ext_atom[first]
    group = group.reshape(-1)

    def build(sel, ext, off_lin):
        oa, ob, oc = ((lo[sel, a, None] + np.arange(ext[a]) - g[sel, a, None]).astype(real)
                      for a in perm)
        q = (gp[1, 1] * ob * ob)[:, :, None] + (gp[2, 2] * oc * oc)[:, None, :]
        if not fac.plane_separable:
            q += 2 * gp[1, 2] * ob[:, :, None] * oc[:, None, :]
        # G_aa δa² < r² - Q, without an (A,e_a,e_b,e_c) array of d²
        left = (r[sel] ** 2).astype(real)[:, None] - q.reshape(len(sel), -1)
        inside = ((gp[0, 0] * oa * oa)[:, :, None] < left[:, None, :]).reshape(len(sel), -1)
        points = base_lin[sel, None] + off_lin[None, :]     # whole box inside the padding
        return atoms[sel], (oa, ob, oc), q, inside, points

    chunks = []
    for gi, ext in enumerate(sizes):
        members = np.nonzero(group == gi)[0]
        # In grid order, so that a chunk's points span a slab of the grid, not all of it.
        members = members[np.argsort(base_lin[members], kind="stable")]
        off_lin = np.indices(ext[perm]).reshape(3, -1).T @ grid.strides[perm]
        # At least one chunk per worker thread, at most _PAIRS_PER_CHUNK pairs each.
        chunk = max(1, min(_PAIRS_PER_CHUNK // len(off_lin), -(-len(members) // _WORKERS)))
        for s in range(0, len(members), chunk):
            chunks.append(functools.partial(build, members[s:s + chunk], ext, off_lin))
    return grid, chunks


def _by_worker(fn, chunks):
    """[fn(share)] for shares of ``chunks`` (callables), one share per worker thread: NumPy's
    array loops, matmul and einsum release the GIL, so the chunks of a model run side by side."""
    shares = [chunks[i::_WORKERS] for i in range(min(_WORKERS, len(chunks)))]
    if len(shares) < 2:
        return [fn(chunks)]
    return list(_pool().map(fn, shares))


@functools.lru_cache(maxsize=1)
def _pool():
    return ThreadPoolExecutor(_WORKERS, thread_name_prefix="gpu_refine-density")


def _line_and_plane(k, d, q, fac):
    """Per atom and Gaussian, exp(-k G_aa δa²) (A,G,e_a) and exp(-k Q) (A,G,e_b*e_c)."""
    gp = fac.gp.astype(q.dtype)
    oa, ob, oc = d
    kk = k[:, :, None]
    line = np.exp(-kk * (gp[0, 0] * oa * oa)[:, None, :])
    if fac.plane_separable:     # outer product: e_b + e_c exponentials instead of e_b * e_c
        plane = (np.exp(-kk * (gp[1, 1] * ob * ob)[:, None, :])[:, :, :, None]
                 * np.exp(-kk * (gp[2, 2] * oc * oc)[:, None, :])[:, :, None, :])
    else:
        plane = np.exp(-kk[..., None] * q[:, None])
    return line, plane.reshape(plane.shape[:2] + (-1,))


def _spread_boxes(amp, k, d, q, inside, fac):
    """Density of each atom's box, sum over Gaussians of amp line⊗plane: (A, e_a*e_b*e_c)."""
    line, plane = _line_and_plane(k, d, q, fac)
    box = np.matmul((amp[:, :, None] * line).transpose(0, 2, 1), plane)      # (A,e_a,e_b*e_c)
    return box.reshape(len(amp), -1) * inside


def _adjoint_boxes(w, amp, k, bt, d, q, fac):
    """For the weights w (A,e_a,e_b*e_c) of each atom's box (zero outside the sphere): per
    atom sum_p w dρ/dx (A,3), sum_p w dρ/dB (A,) and sum_p w ρ (A,).

    The plane moments (1, δb, δc, Q) of each Gaussian are contracted with w in one batched
    matrix product, then the line moments (1, δa, δa²); the xyz gradient is M's steps times
    the δ moments, and |d|² = G_aa δa² + Q."""
    line, plane = _line_and_plane(k, d, q, fac)
    oa, ob, oc = d
    a, ng = k.shape
    ob = np.broadcast_to(ob[:, :, None], q.shape).reshape(a, 1, -1)
    oc = np.broadcast_to(oc[:, None, :], q.shape).reshape(a, 1, -1)
    moments = np.stack([plane, plane * ob, plane * oc, plane * q.reshape(a, 1, -1)],
                       axis=2)                                                # (A,G,4,e_bc)
    z = np.matmul(moments.reshape(a, 4 * ng, -1), w.transpose(0, 2, 1))       # (A,G·4,e_a)
    z = z.reshape(a, ng, 4, -1) * line[:, :, None, :]
    oa = oa[:, None, :]
    s0 = z[:, :, 0]
    s00, s10, s20 = s0.sum(-1), (s0 * oa).sum(-1), (s0 * oa * oa).sum(-1)
    s0b, s0c, s0q = (z[:, :, j].sum(-1) for j in (1, 2, 3))
    ka = 2.0 * k * amp
    g_steps = np.stack([(ka * s10).sum(1), (ka * s0b).sum(1), (ka * s0c).sum(1)], axis=1)
    pos = g_steps @ fac.mp.T.astype(g_steps.dtype)
    d2 = fac.gp[0, 0] * s20 + s0q
    return pos, (amp / bt * (k * d2 - 1.5 * s00)).sum(1), (amp * s00).sum(1)


def _rho_terms(shapes, m, atom, offsets, d2):
    """rho_g (P,G) for the pairs of model m; for anisotropic atoms also S d (P,G,3)."""
    real = d2.dtype
    amp, k = (a.astype(real)[atom] for a in _model_rows(shapes, m, "amp", "k"))
    rho = amp * np.exp(-k * d2[:, None])
    if shapes["s"] is None:
        return rho, None, None
    sel = np.nonzero(shapes["aniso"][m, atom])[0]
    if not len(sel):
        return rho, None, None
    d = offsets.d[sel].astype(np.float64)
    s = shapes["s"][m, atom[sel]]                                  # (P',G,3,3)
    sd = np.einsum("pgij,pj->pgi", s, d)
    rho[sel] = amp[sel] * np.exp(-_FOUR_PI2 * np.einsum("pgi,pi->pg", sd, d))
    return rho, sel, (sd, s)


def spread_density(xyz, b, u, is_aniso, occ, stype, coefs, radius, geom, blur, periodic, out):
    """Sum the density of every atom of model m into out[m] (B,n0,n1,n2); returns out."""
    shapes = _atom_shapes(b, u, is_aniso, stype, coefs, blur)
    fac = _factorisation(geom) if shapes["s"] is None else None
    real = _real(xyz)
    for m in range(xyz.shape[0]):
        o = occ[m].astype(np.float64)
        if fac is not None:
            grid, chunks = _boxes(xyz[m], radius[m], geom, out.shape[1:], periodic, fac)
            size = int(np.prod(grid.shape))
            amp_all, k_all = (a.astype(real) for a in _model_rows(shapes, m, "amp", "k"))

            def share(chunks):
                acc = np.zeros(size)
                for chunk in chunks:
                    atom, d, q, inside, point = chunk()
                    box = _spread_boxes((amp_all[atom] * o[atom, None]).astype(real),
                                        k_all[atom], d, q, inside, fac)
                    first, last = int(point.min()), int(point.max()) + 1
                    acc[first:last] += np.bincount((point - first).ravel(),
                                                   weights=box.ravel(),
                                                   minlength=last - first)
                return acc
            parts = _by_worker(share, chunks)
            for part in parts[1:]:
                parts[0] += part
            out[m] = grid.fold(parts[0])
            continue
        grid, chunks = _pairs(xyz[m], radius[m], geom, out.shape[1:], periodic)
        acc = np.zeros(int(np.prod(grid.shape)))
        for atom, offsets, d2, point in chunks:
            rho, _, _ = _rho_terms(shapes, m, atom, offsets, d2)
            acc += np.bincount(point, weights=o[atom] * rho.sum(axis=1), minlength=acc.size)
        out[m] = grid.fold(acc)
    return out


def density_adjoint(xyz, b, u, is_aniso, occ, stype, coefs, radius, geom, blur, periodic, dmap,
                    out=None):
    """Gradients of T = sum(dmap * rho) with respect to xyz, b, u and occ of every atom.

    Returns (g_xyz (B,N,3), g_b (B,N), g_u (B,N,6), g_occ (B,N)) in xyz's dtype, written into
    ``out`` (a tuple of those four arrays) when given.
    """
    shapes = _atom_shapes(b, u, is_aniso, stype, coefs, blur)
    nm, na = xyz.shape[:2]
    gx, gb = np.zeros((nm, na, 3)), np.zeros((nm, na))
    gu, go = np.zeros((nm, na, 6)), np.zeros((nm, na))
    fac = _factorisation(geom) if shapes["s"] is None else None
    real = _real(xyz)
    for m in range(nm):
        k_all, bt_all = _model_rows(shapes, m, "k", "bt")
        if fac is not None:
            grid, chunks = _boxes(xyz[m], radius[m], geom, dmap.shape[1:], periodic, fac)
            w_flat = grid.expand(np.asarray(dmap[m], dtype=real)).reshape(-1)
            amp_all, k_r, bt_r = (a.astype(real)
                                  for a in _model_rows(shapes, m, "amp", "k", "bt"))

            def share(chunks):
                results = []
                for chunk in chunks:
                    atom, d, q, inside, point = chunk()
                    w = (w_flat[point] * inside).reshape(len(atom), d[0].shape[1], -1)
                    results.append((atom, _adjoint_boxes(w, amp_all[atom], k_r[atom],
                                                         bt_r[atom], d, q, fac)))
                return results
            for part in _by_worker(share, chunks):
                for atom, (pos, db, dn) in part:
                    gx[m, atom] += pos
                    gb[m, atom] += db
                    go[m, atom] += dn
            continue
        grid, chunks = _pairs(xyz[m], radius[m], geom, dmap.shape[1:], periodic)
        w_flat = grid.expand(np.asarray(dmap[m])).reshape(-1)
        for atom, offsets, d2, point in chunks:
            rho, sel, aniso = _rho_terms(shapes, m, atom, offsets, d2)
            d = offsets.d
            wr = w_flat[point][:, None] * rho                          # (P,G)
            k, bt = k_all[atom], bt_all[atom]
            pos = 2.0 * (k * wr).sum(axis=1)[:, None] * d              # d rho / d x, isotropic
            db = (wr * (k * d2[:, None] - 1.5) / bt).sum(axis=1)
            if sel is not None:
                sd, s = aniso
                wrs = wr[sel]
                pos[sel] = 2.0 * _FOUR_PI2 * np.einsum("pg,pgi->pi", wrs, sd)
                db[sel] = 0.0
                outer = _FOUR_PI2 * np.einsum("pgi,pgj->pgij", sd, sd) - 0.5 * s
                dbm = 8 * np.pi**2 * np.einsum("pg,pgij->pij", wrs, outer)
                du = np.stack([dbm[:, 0, 0], dbm[:, 1, 1], dbm[:, 2, 2],
                               2 * dbm[:, 0, 1], 2 * dbm[:, 0, 2], 2 * dbm[:, 1, 2]], axis=1)
                for c in range(6):
                    gu[m, :, c] += np.bincount(atom[sel], weights=du[:, c], minlength=na)
            for c in range(3):
                gx[m, :, c] += np.bincount(atom, weights=pos[:, c], minlength=na)
            gb[m] += np.bincount(atom, weights=db, minlength=na)
            go[m] += np.bincount(atom, weights=wr.sum(axis=1), minlength=na)
    o = occ.astype(np.float64)
    result = (gx * o[..., None], gb * o, gu * o[..., None], go)
    if out is None:
        return tuple(r.astype(xyz.dtype) for r in result)
    for dst, src in zip(out, result):
        dst[...] = src
    return out
