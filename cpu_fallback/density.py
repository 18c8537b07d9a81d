"""Batched atomic density on a grid and its adjoint (twin of ``kernels/density.cu``).

Arguments shared by the functions (B models, N atoms, T scattering types, G = 5 Gaussians):

xyz (B,N,3), b (B,N), u (B,N,6) or None, is_aniso (N,) bool or None, occ (B,N),
stype (N,) int, coefs (T,2,G) float64 [a; b], radius (B,N) in Å,
geom (21,) float64: index_from_xyz (3x3), xyz_from_index (3x3), origin (3),
blur (Å²), periodic: one bool for every axis or one per axis (3,) — where the grid wraps
around (the kernels take it as a bit mask).

Where the kernel loops over the points around each atom, NumPy works on a padded copy of each
model's grid so that every point of an atom's box has a flat index ``base[atom] + offset[k]``
(a periodic grid folds its padding back), and computes whole boxes at once, points outside
the atom's sphere (d² ≥ r²) masked, so the same points take part as in the kernel.

For isotropic atoms on a grid with one index axis a perpendicular to the other two (b, c) —
every cell but a triclinic one: cryo-EM boxes, orthogonal, monoclinic, hexagonal cells — each
Gaussian factorises as exp(-k d²) = exp(-k G_aa δa²) · exp(-k Q(δb, δc)), with δ the offset in
grid steps, G the grid's metric and Q its (b, c) part; the plane factor is itself an outer
product of per-axis factors where b and c are perpendicular too.  So the density of an atom's
box is a product of a line and a plane factor, and the sums of the adjoint are contractions
with them.  Other atoms (anisotropic ones, any atom of a triclinic grid) have exp(-δ^T H δ)
over the whole box, and their adjoint needs only the box's moments of degree 0-2 weighted by
each Gaussian (one batched matrix product).  The chunks of atoms of one model run on worker
threads (one per core).
"""
import functools
import logging
import os
import queue
import threading

import numpy as np

NGAUSS = 5
_FOUR_PI2 = 4.0 * np.pi**2
_PAIRS_PER_CHUNK = 1 << 21


MAX_THREADS = 1024


def threads_setting(value):
    """The thread count that GPU_REFINE_THREADS=``value`` asks for; ValueError, saying what
    it must be, where it asks for none."""
    if value.isdigit() and 1 <= int(value) <= MAX_THREADS:
        return int(value)
    raise ValueError(f"GPU_REFINE_THREADS={value!r}: give a number of threads from 1 to "
                     f"{MAX_THREADS}, or leave it unset (one per core)")


@functools.lru_cache(maxsize=1)
def _worker_count():
    """GPU_REFINE_THREADS if set, else the cores this process may use (at most 16).  Read at
    the first model map, not at import, so that a command can check the variable first."""
    value = os.environ.get("GPU_REFINE_THREADS", "").strip()
    if value:
        try:
            return threads_setting(value)
        except ValueError as exc:
            logging.getLogger(__name__).warning("%s; using one per core", exc)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(16, cores or 1))


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


def total_b(b, u, is_aniso, blur):
    """Each atom's B for its radius (B,N) float64: B + blur, or for an anisotropic atom 8pi²
    times its largest diagonal U + blur."""
    bt = b.astype(np.float64) + blur
    if u is not None and is_aniso is not None and np.any(is_aniso):
        bmax = 8 * np.pi**2 * u[..., :3].astype(np.float64).max(axis=-1) + blur
        bt = np.where(np.asarray(is_aniso, dtype=bool)[None], bmax, bt)
    return bt


def it92_radius_approx(b):
    """gemmi's first guess of the density radius for total B (Å²)."""
    return (8.5 + 0.075 * b) / (2.4 + 0.0045 * b)


def cutoff_radii(b, u, is_aniso, stype, coefs, blur, cutoff, out, max_steps=64):
    """Radius (Å) of every atom (B,N), written into ``out``: where its density
    sum_g a_g (4pi/Bt_g)^1.5 exp(-4pi² r²/Bt_g), Bt_g = b_g + total_b, falls to ``cutoff``.
    Same search as gemmi's determine_cutoff_radius: 0.5 Å steps from it92_radius_approx
    (inwards while below the cutoff, else outwards while above, at most max_steps), then
    linear interpolation between the last two points."""
    bt = total_b(b, u, is_aniso, blur)
    atom_coefs = coefs[stype]                                        # (N,2,G)
    btot = atom_coefs[None, :, 1, :] + bt[..., None]                 # (B,N,G)
    amp = atom_coefs[None, :, 0, :] * (4 * np.pi / btot) ** 1.5
    k = _FOUR_PI2 / btot

    def f(x):
        return np.abs((amp * np.exp(-k * (x * x)[..., None])).sum(axis=-1))

    x1 = it92_radius_approx(bt)
    y1 = f(x1)
    x2, y2 = x1.copy(), y1.copy()
    down = y1 < cutoff
    active = down.copy()           # walk inwards: x1 ends above the cutoff, x2 below
    for _ in range(max_steps):
        if not active.any():
            break
        x2 = np.where(active, x1, x2)
        y2 = np.where(active, y1, y2)
        x1 = np.where(active, np.maximum(x1 - 0.5, 0.0), x1)
        y1 = np.where(active, f(x1), y1)
        active &= (y1 < cutoff) & (x1 > 0)
    active = ~down                 # or outwards
    for _ in range(max_steps):
        if not active.any():
            break
        x1 = np.where(active, x2, x1)
        y1 = np.where(active, y2, y1)
        x2 = np.where(active, x2 + 0.5, x2)
        y2 = np.where(active, f(x2), y2)
        active &= y2 > cutoff
    denom = np.where(y1 == y2, 1.0, y1 - y2)
    out[...] = x1 + (x1 - x2) / denom * (cutoff - y1)
    return out


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


def _atom_boxes(xyz_m, radius_m, geom, shape, periodic):
    """Grid coordinates g and box corners lo of the atoms whose sphere touches the grid (along
    its periodic axes every atom does), their radii, index steps per Å along each axis, padded
    grid.

    The padding covers two radii beyond the grid (plus two points each): every point of an
    atom's whole box."""
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
    grid = _PaddedGrid(shape, np.ceil(2 * rmax * rn).astype(np.int64) + 2, wrap)
    return atoms, g, lo, r, rn, grid


class _Layout:
    """The grid's axes in the order ``perm`` (a, b, c), its metric ``gp`` (Å² per grid step², in
    that order), ``mp`` the xyz of one step along each, and which of the metric's off-diagonal
    terms vanish: axis a perpendicular to b and c (``line_separable``), b to c
    (``plane_separable``)."""

    def __init__(self, perm, metric, orth):
        self.perm = perm
        self.gp = metric[np.ix_(perm, perm)]
        self.mp = orth[:, perm]
        self.line_separable = self.gp[0, 1] == 0.0 and self.gp[0, 2] == 0.0
        self.plane_separable = self.gp[1, 2] == 0.0


def _metric(geom):
    """xyz of one step along each grid axis (3x3, by columns) and the grid's metric, with
    rounding noise in the off-diagonal terms set to zero."""
    orth = geom[9:18].reshape(3, 3)
    metric = orth.T @ orth
    tiny = 1e-12 * np.abs(np.diag(metric)).max()
    return orth, np.where(np.abs(metric) <= tiny, 0.0, metric)


def _factorisation(geom):
    """The _Layout with an index axis perpendicular to both others first, or None where there
    is none (a triclinic cell)."""
    orth, metric = _metric(geom)
    for a in range(3):
        b, c = (x for x in range(3) if x != a)
        if metric[a, b] == 0.0 and metric[a, c] == 0.0:
            return _Layout([a, b, c], metric, orth)
    return None


def _general_layout(geom):
    """The _Layout of the grid's own axis order, for the boxes of atoms whose Gaussians do not
    factorise (anisotropic atoms, or any atom of a triclinic grid)."""
    orth, metric = _metric(geom)
    return _Layout([0, 1, 2], metric, orth)


def _boxes(boxes, layout, select, real, per_chunk):
    """Chunks of the atoms of one model that ``select`` (N,) bool picks among ``boxes``
    (``_atom_boxes`` with reach 2), each a callable returning (atoms (A,), [δa, δb, δc]
    (A,e_axis) offsets from the atom in grid steps, axes in layout.perm's order, Q(δb, δc)
    (A,e_b,e_c) Å², inside (A,e_a*e_b*e_c) bool (|d| < radius), flat points (A,e_a*e_b*e_c)
    of the padded grid), the box in (a, b, c) order; built when called, on the worker thread
    that uses it.  At most ``per_chunk`` box points per chunk."""
    atoms, g, lo, r, rn, grid = boxes
    keep = np.nonzero(select[atoms])[0]
    if not len(keep):
        return []
    atoms, g, lo, r = atoms[keep], g[keep], lo[keep], r[keep]
    perm, gp = layout.perm, layout.gp.astype(real)
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
        if not layout.plane_separable:
            q += 2 * gp[1, 2] * ob[:, :, None] * oc[:, None, :]
        # |d|² = G_aa δa² + 2 δa (G_ab δb + G_ac δc) + Q < r², without an (A,e_a,e_b,e_c)
        # array of d² where the middle term vanishes
        left = (r[sel] ** 2).astype(real)[:, None] - q.reshape(len(sel), -1)
        da = (gp[0, 0] * oa * oa)[:, :, None]
        if not layout.line_separable:
            cross = 2 * (gp[0, 1] * ob[:, :, None] + gp[0, 2] * oc[:, None, :])
            da = da + oa[:, :, None] * cross.reshape(len(sel), 1, -1)
        inside = (da < left[:, None, :]).reshape(len(sel), -1)
        points = base_lin[sel, None] + off_lin[None, :]     # whole box inside the padding
        return atoms[sel], (oa, ob, oc), q, inside, points

    chunks = []
    for gi, ext in enumerate(sizes):
        members = np.nonzero(group == gi)[0]
        # In grid order, so that a chunk's points span a slab of the grid, not all of it.
        members = members[np.argsort(base_lin[members], kind="stable")]
        off_lin = np.indices(ext[perm]).reshape(3, -1).T @ grid.strides[perm]
        # At least one chunk per worker thread, at most per_chunk points each.
        chunk = max(1, min(per_chunk // len(off_lin), -(-len(members) // _worker_count())))
        for s in range(0, len(members), chunk):
            chunks.append(functools.partial(build, members[s:s + chunk], ext, off_lin))
    return chunks


def _by_worker(fn, chunks):
    """[fn(share)] for shares of ``chunks`` (callables), one share per worker thread: NumPy's
    array loops, matmul and einsum release the GIL, so the chunks of a model run side by side."""
    workers = _worker_count()
    shares = [chunks[i::workers] for i in range(min(workers, len(chunks)))]
    if len(shares) < 2:
        return [fn(chunks)]
    return list(_pool().map(fn, shares))


class _DaemonPool:
    """Worker threads that never hold up the interpreter's exit.  ThreadPoolExecutor's do:
    a run stopped by SIGTERM or Ctrl-C while it was starting a worker left that worker out of
    the shutdown's reach, and the process waited for it forever (1 stop in ~8 under load)."""

    def __init__(self, n):
        self._tasks = queue.SimpleQueue()
        for i in range(n):
            threading.Thread(target=self._work, daemon=True,
                             name=f"gpu_refine-density-{i}").start()

    def _work(self):
        while True:
            fn, arg, box, done = self._tasks.get()
            try:
                box.append((True, fn(arg)))
            except BaseException as exc:  # handed to the caller, raised there
                box.append((False, exc))
            done.set()

    def map(self, fn, items):
        """[fn(item)] for ``items``, run by the workers; the first exception is raised."""
        pending = []
        for item in items:
            box, done = [], threading.Event()
            self._tasks.put((fn, item, box, done))
            pending.append((box, done))
        out = []
        for box, done in pending:
            done.wait()
            ok, value = box[0]
            if not ok:
                raise value
            out.append(value)
        return out


@functools.lru_cache(maxsize=1)
def _pool():
    return _DaemonPool(_worker_count())


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


def _quadratic_forms(shapes, m, layout):
    """Per atom and Gaussian of model m the matrix H (N,G,3,3) of the exponent δ^T H δ in grid
    steps (axes in layout.perm's order): k G for isotropic atoms, 4pi² M^T S M for anisotropic
    ones."""
    (k,) = _model_rows(shapes, m, "k")
    h = k[:, :, None, None] * layout.gp
    if shapes["s"] is not None:
        mp = layout.mp
        aniso = _FOUR_PI2 * (mp.T @ shapes["s"][m] @ mp)
        h = np.where(shapes["aniso"][m][:, None, None, None], aniso, h)
    return h


def _densities(h, d):
    """exp(-δ^T H δ) for every Gaussian of each atom's box: (A,G,e_a*e_b*e_c), built in
    place (three passes over the box, one array)."""
    oa, ob, oc = d
    ob, oc = ob[:, None, :, None], oc[:, None, None, :]
    hh = -h[..., None, None]
    plane = hh[:, :, 1, 1] * ob * ob + hh[:, :, 2, 2] * oc * oc + 2 * hh[:, :, 1, 2] * ob * oc
    cross = 2 * (hh[:, :, 0, 1] * ob + hh[:, :, 0, 2] * oc)                   # (A,G,e_b,e_c)
    oa = oa[:, None, :, None, None]
    e = oa * cross[:, :, None]
    e += plane[:, :, None]
    e += hh[:, :, 0, 0, None] * oa * oa
    e = e.reshape(e.shape[:2] + (-1,))
    return np.exp(e, out=e)


def _spread_general(amp, h, d, inside):
    """Density of each atom's box, sum over Gaussians of amp exp(-δ^T H δ): (A, e_a*e_b*e_c)."""
    return np.matmul(amp[:, None, :], _densities(h, d))[:, 0] * inside


def _box_moments(wr, d):
    """Sums over each box of wr (A,G,e_a*e_b*e_c) times 1, δa, δb, δc, δa², δb², δc², δaδb,
    δaδc, δbδc: (A,G,10).  One axis at a time (powers 0-2 of δc, then of δb, then of δa), so
    that the box is read once and no (A,K,10) array of monomials is made."""
    oa, ob, oc = d
    a, g = wr.shape[:2]
    ea, eb, ec = oa.shape[1], ob.shape[1], oc.shape[1]

    def powers(o):                                  # (A,3,e): 1, δ, δ²
        return np.stack([np.ones_like(o), o, o * o], axis=1)
    t = np.matmul(wr.reshape(a, g * ea * eb, ec), powers(oc).transpose(0, 2, 1))
    t = np.matmul(powers(ob)[:, None], t.reshape(a, g * ea, eb, 3))          # (A,G·e_a,3,3)
    t = np.matmul(powers(oa)[:, None], t.reshape(a, g, ea, 9))               # (A,G,3,9)
    # t[..., i, 3j + k] = sum δa^i δb^j δc^k
    return t[:, :, [0, 1, 0, 0, 2, 0, 0, 1, 1, 0], [0, 0, 3, 1, 0, 6, 2, 3, 1, 4]]


def _adjoint_general(w, amp, k, bt, h, s, aniso, d, layout):
    """For the weights w (A,e_a*e_b*e_c) of each atom's box (zero outside the sphere): per
    atom sum_p w dρ/dx (A,3), sum_p w dρ/dB (A,) (isotropic atoms), sum_p w dρ/dU (A,6)
    (anisotropic ones) and sum_p w ρ (A,).

    Each Gaussian's weighted density is contracted with the box's monomials of degree 0-2
    (``_box_moments``); the gradients are those moments taken to Å through M:
    d = M δ, dρ_g/dx = 2 ρ_g K_g d with K_g = k_g I or 4pi² S_g, and |d|² or d d^T for B or U."""
    a = len(w)
    wr = _densities(h, d)                                                      # (A,G,K)
    wr *= amp[:, :, None]
    wr *= w[:, None, :]
    mom = _box_moments(wr, d)                                                  # (A,G,10)
    n0 = mom[..., 0]
    mp = layout.mp.astype(mom.dtype)
    d1 = mom[..., 1:4] @ mp.T                                                  # Å, (A,G,3)
    m2 = mom[..., [4, 7, 8, 7, 5, 9, 8, 9, 6]].reshape(mom.shape[:2] + (3, 3))
    d2 = mp @ m2 @ mp.T                                                        # Å², (A,G,3,3)
    pos = 2.0 * (k[..., None] * d1).sum(1)
    dbf = ((k * np.trace(d2, axis1=-2, axis2=-1) - 1.5 * n0) / bt).sum(1)
    du = np.zeros((a, 6), dtype=mom.dtype)
    if aniso.any():
        sel = np.nonzero(aniso)[0]
        s = s[sel].astype(mom.dtype)
        pos[sel] = 2.0 * _FOUR_PI2 * np.einsum("agij,agj->ai", s, d1[sel])
        dbf[sel] = 0.0
        dbm = 8 * np.pi**2 * (_FOUR_PI2 * s @ d2[sel] @ s - 0.5 * n0[sel, :, None, None] * s).sum(1)
        du[sel] = np.stack([dbm[:, 0, 0], dbm[:, 1, 1], dbm[:, 2, 2], 2 * dbm[:, 0, 1],
                            2 * dbm[:, 0, 2], 2 * dbm[:, 1, 2]], axis=1)
    return pos, dbf, du, n0.sum(1)


def _model_chunks(shapes, m, xyz_m, radius_m, geom, shape, periodic, real):
    """The padded grid of model m and its chunks as (H or None, layout, chunk): isotropic atoms
    on a grid that factorises go by line and plane factors (H None, the factorised layout),
    the others (anisotropic atoms, every atom of a triclinic grid) by their quadratic forms
    H (N,G,3,3) in the grid's own axis order."""
    boxes = _atom_boxes(xyz_m, radius_m, geom, shape, periodic)
    aniso = shapes["aniso"][m]
    fac = _factorisation(geom)
    chunks = []
    if fac is not None:
        chunks += [(None, fac, c) for c in _boxes(boxes, fac, ~aniso, real, _PAIRS_PER_CHUNK)]
    rest = aniso if fac is not None else np.ones_like(aniso)
    if rest.any():
        general = _general_layout(geom)
        h = _quadratic_forms(shapes, m, general).astype(real)
        # (A,G,K) arrays: a fifth of the points per chunk
        chunks += [(h, general, c)
                   for c in _boxes(boxes, general, rest, real, _PAIRS_PER_CHUNK // NGAUSS)]
    return boxes[-1], chunks


def spread_density(xyz, b, u, is_aniso, occ, stype, coefs, radius, geom, blur, periodic, out,
                   radius_max=None):
    """Sum the density of every atom of model m into out[m] (B,n0,n1,n2); returns out.
    ``radius_max``: an upper bound of radius where the caller knows one (the GPU twin sizes
    its launch by it; here each atom's box is its own)."""
    shapes = _atom_shapes(b, u, is_aniso, stype, coefs, blur)
    real = _real(xyz)
    for m in range(xyz.shape[0]):
        o = occ[m].astype(np.float64)
        grid, chunks = _model_chunks(shapes, m, xyz[m], radius[m], geom, out.shape[1:],
                                     periodic, real)
        size = int(np.prod(grid.shape))
        amp_all, k_all = (a.astype(real) for a in _model_rows(shapes, m, "amp", "k"))

        def share(chunks):
            acc = np.zeros(size)
            for h, layout, chunk in chunks:
                atom, d, q, inside, point = chunk()
                amp = (amp_all[atom] * o[atom, None]).astype(real)
                if h is None:
                    box = _spread_boxes(amp, k_all[atom], d, q, inside, layout)
                else:
                    box = _spread_general(amp, h[atom], d, inside)
                first, last = int(point.min()), int(point.max()) + 1
                acc[first:last] += np.bincount((point - first).ravel(), weights=box.ravel(),
                                               minlength=last - first)
            return acc
        parts = _by_worker(share, chunks) if chunks else [np.zeros(size)]
        for part in parts[1:]:
            parts[0] += part
        out[m] = grid.fold(parts[0])
    return out


def density_adjoint(xyz, b, u, is_aniso, occ, stype, coefs, radius, geom, blur, periodic, dmap,
                    out=None, radius_max=None):
    """Gradients of T = sum(dmap * rho) with respect to xyz, b, u and occ of every atom
    (``radius_max`` as spread_density's).

    Returns (g_xyz (B,N,3), g_b (B,N), g_u (B,N,6), g_occ (B,N)) in xyz's dtype, written into
    ``out`` (a tuple of those four arrays) when given.
    """
    shapes = _atom_shapes(b, u, is_aniso, stype, coefs, blur)
    nm, na = xyz.shape[:2]
    gx, gb = np.zeros((nm, na, 3)), np.zeros((nm, na))
    gu, go = np.zeros((nm, na, 6)), np.zeros((nm, na))
    real = _real(xyz)
    for m in range(nm):
        grid, chunks = _model_chunks(shapes, m, xyz[m], radius[m], geom, dmap.shape[1:],
                                     periodic, real)
        if not chunks:
            continue
        w_flat = grid.expand(np.asarray(dmap[m], dtype=real)).reshape(-1)
        amp_all, k_r, bt_r = (a.astype(real) for a in _model_rows(shapes, m, "amp", "k", "bt"))
        aniso_m = shapes["aniso"][m]
        s_m = shapes["s"][m] if shapes["s"] is not None else None

        def share(chunks):
            results = []
            for h, layout, chunk in chunks:
                atom, d, q, inside, point = chunk()
                w = w_flat[point] * inside
                if h is None:
                    pos, db, dn = _adjoint_boxes(w.reshape(len(atom), d[0].shape[1], -1),
                                                 amp_all[atom], k_r[atom], bt_r[atom], d, q,
                                                 layout)
                    du = None
                else:
                    pos, db, du, dn = _adjoint_general(
                        w, amp_all[atom], k_r[atom], bt_r[atom], h[atom],
                        None if s_m is None else s_m[atom], aniso_m[atom], d, layout)
                results.append((atom, pos, db, du, dn))
            return results
        for part in _by_worker(share, chunks):
            for atom, pos, db, du, dn in part:
                gx[m, atom] += pos
                gb[m, atom] += db
                go[m, atom] += dn
                if du is not None:
                    gu[m, atom] += du
    o = occ.astype(np.float64)
    result = (gx * o[..., None], gb * o, gu * o[..., None], go)
    if out is None:
        return tuple(r.astype(xyz.dtype) for r in result)
    for dst, src in zip(out, result):
        dst[...] = src
    return out
