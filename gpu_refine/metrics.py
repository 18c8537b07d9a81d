"""Map-model agreement for a batch of models against one map (Afonine et al. 2018, Acta D74:814).

CCmask: inside the molecular mask (cctbx's bulk-solvent mask around the atoms); CCbox: the whole
box; CCvolume: the N highest model-map points, N = mask size; CCpeaks: union of the N highest
points of each map; per-residue CC: points within ``atom_radius`` of a residue's atoms.
"""
import gemmi
import numpy as np

from .backend import to_host
from .mapprep import box_indices, box_slices, box_spec, enclosing_box
from .scattering import form_factor_table


def molecular_mask(model, xyz, spec):
    """Boolean (n0,n1,n2): True inside the molecule (cctbx radii, probe 1.1 Å, shrink 0.9 Å).

    The stored box is treated as its own periodic P1 cell, as mmtbx's five_cc does for boxes;
    a crystal's full cell keeps its space group.
    """
    crystal = spec.is_crystal
    box = np.asarray(spec.cell[:3]) * np.asarray(spec.shape) / np.asarray(spec.sampling)
    grid = gemmi.FloatGrid(*spec.shape)
    grid.set_unit_cell(gemmi.UnitCell(*box, *spec.cell[3:]))
    grid.spacegroup = gemmi.SpaceGroup(spec.spacegroup if crystal else "P 1")
    # A box is its own cell with point 0 at origin_xyz; a crystal cell keeps its symmetry
    # about the cell origin, and the stored array starts at NSTART.
    shift = np.zeros(3) if crystal else spec.origin_xyz
    st = model.to_gemmi(np.asarray(xyz, dtype=np.float64) - shift)
    masker = gemmi.SolventMasker(gemmi.AtomicRadiiSet.Cctbx)
    masker.put_mask_on_float_grid(grid, st[0])
    inside = np.array(grid, copy=True) == 0
    if crystal:
        inside = np.roll(inside, [-int(s) for s in spec.start], axis=(0, 1, 2))
    return inside


# Å beyond the atoms within which a molecular mask ends (cctbx radii + 1.1 Å probe, shrunk
# by 0.9 Å: 2 Å was measured to hold it whole; the rest is room).
MASK_CUSHION = 6.0
# Å beyond the atoms of the box in which model maps are made for the CCs on a map much larger
# than the models: the mask's cushion and room for the image's ripples (EMD-2566 set in a 160³
# map: CCmask within 5e-5 and CCbox within 1e-5 of the whole map's, from 6 Å on).
MODEL_BOX_CUSHION = 10.0


def molecular_masks(model, xyz, spec):
    """Boolean (B,n0,n1,n2): ``molecular_mask`` of each model of ``xyz`` (B,N,3).  On a map
    that is no crystal's cell each is made in a box around the models and set into the map:
    the same mask, at the cost of the box, not of the map."""
    xyz = np.asarray(xyz, dtype=np.float64)
    if spec.is_crystal:
        return np.stack([molecular_mask(model, x, spec) for x in xyz])
    lo, hi = box_indices(spec, xyz, MASK_CUSHION)
    box = box_spec(spec, lo, hi)
    src, dst = box_slices(spec, lo, hi)
    out = np.zeros((len(xyz),) + tuple(spec.shape), dtype=bool)
    for inside, x in zip(out, xyz):
        inside[src] = molecular_mask(model, x, box)[dst]
    return out


def correlation(xp, x, y, weight=None):
    """Pearson CC of x and y along their last axis ((P,) or (B, P)), over the points where
    ``weight`` (bool) is True: deviations in the inputs' precision, sums in float64, and no
    whole-map float64 copies (a 256³ map has 17 M points)."""
    if x.ndim == 2:
        return xp.stack([correlation(xp, x[i], y[i], None if weight is None else weight[i])
                         for i in range(x.shape[0])])
    if weight is not None:
        x, y = x[weight], y[weight]
    dx, dy = _deviations(xp, x), _deviations(xp, y)
    sxy = (dx * dy).sum(dtype=xp.float64)
    den = xp.sqrt((dx * dx).sum(dtype=xp.float64) * (dy * dy).sum(dtype=xp.float64))
    # A flat map has no correlation: NaN, without a division by zero.
    return xp.where(den > 0, sxy, xp.nan) / xp.where(den > 0, den, 1.0)


def _deviations(xp, x):
    """x minus its mean (summed in float64), in x's precision."""
    return x - (x.sum(dtype=xp.float64) / max(x.size, 1)).astype(x.dtype)


def _top_n(xp, values, n):
    """Boolean: the points at or above the value ranked n+1 from the top (as mmtbx does)."""
    flat = values.reshape(-1)
    n = int(min(n, flat.size - 1))
    k = flat.size - 1 - n
    threshold = xp.partition(flat, k)[k]
    return values >= threshold


def _host(values):
    return {k: to_host(v).astype(np.float64) for k, v in values.items()}


def _flat(xp, exp_map, model_maps, masks):
    nb = model_maps.shape[0]
    m = xp.broadcast_to(exp_map[None], model_maps.shape).reshape(nb, -1)
    return m, model_maps.reshape(nb, -1), masks.reshape(nb, -1)


def model_box(spec, xyz, cushion=MODEL_BOX_CUSHION):
    """(lo, hi): the box of ``spec``'s grid around the models ``xyz`` (B,N,3) plus ``cushion`` Å
    in which their model maps and masks are made for CCmask and CCbox, or None where that is
    the whole map: a crystal's cell, a map hardly larger than the box (over half its points),
    or a box that would reach past the map's faces (where the map's own periodic image
    counts).  The Fourier image on the box's grid differs from the whole map's by a few 1e-3
    of its peak (the resolution sphere sampled more coarsely): CCmask and CCbox by ~1e-4,
    while CCpeaks and per-residue CCs (``validate``) would move by 1e-3 to 1e-2, so those
    keep the whole map."""
    if spec.is_crystal:
        return None
    shape = np.asarray(spec.shape)
    # Both the box with its whole cushion and the FFT-friendly box grown from it inside the map.
    for lo, hi in (enclosing_box(spec, xyz, cushion), box_indices(spec, xyz, cushion)):
        if np.any(lo < 0) or np.any(hi > shape):
            return None
    if 2 * np.prod(hi - lo) > np.prod(shape):
        return None
    return lo, hi


def mask_and_box_cc(xp, exp_map, model_maps, masks, region=None):
    """CCmask and CCbox per model (what refinement reports): dict of (B,) NumPy arrays.

    With ``region`` (slices of exp_map), model_maps and masks cover only that part of the
    map, and the model maps are zero beyond it: CCbox takes the whole map's sums and the
    region's products."""
    if region is None:
        m, c, mk = _flat(xp, exp_map, model_maps, masks)
        return _host({"cc_mask": correlation(xp, m, c, mk), "cc_box": correlation(xp, m, c)})
    m, c, mk = _flat(xp, exp_map[region], model_maps, masks)
    dy = _deviations(xp, exp_map)
    n, syy = dy.size, (dy * dy).sum(dtype=xp.float64)
    dy = dy[region].reshape(-1)
    x = c.astype(xp.float64)
    mx = x.sum(axis=1) / n
    sxx = (x * x).sum(axis=1) - n * mx * mx
    sxy = (x * dy).sum(axis=1)
    return _host({"cc_mask": correlation(xp, m, c, mk),
                  "cc_box": sxy / xp.sqrt(xp.maximum(sxx, 0.0) * syy)})


def five_cc(xp, exp_map, model_maps, masks):
    """CCmask, CCbox, CCvolume, CCpeaks per model: dict of (B,) NumPy arrays.

    exp_map (n0,n1,n2); model_maps (B,n0,n1,n2); masks (B,n0,n1,n2) bool.
    """
    m, c, mk = _flat(xp, exp_map, model_maps, masks)
    vol, peaks = [], []
    for i in range(c.shape[0]):
        n = int(mk[i].sum())
        top_model = _top_n(xp, c[i], n)
        vol.append(correlation(xp, m[i], c[i], top_model))
        peaks.append(correlation(xp, m[i], c[i], top_model | _top_n(xp, m[i], n)))
    return {**mask_and_box_cc(xp, exp_map, model_maps, masks),
            **_host({"cc_volume": xp.stack(vol), "cc_peaks": xp.stack(peaks)})}


def image_radius(d_min, b_iso, element="C", table="electron"):
    """Radius (Å) of the first minimum of a resolution-limited atom image: the atom radius
    mmtbx uses for per-atom and per-residue CC (an atom's image at d_min with B = mean B)."""
    coefs = form_factor_table([element], table)[0]
    s = np.linspace(0.0, 1.0 / d_min, 400)
    f = (coefs[0][:, None] * np.exp(-np.outer(coefs[1], s * s) / 4)).sum(axis=0)
    f *= np.exp(-b_iso * s * s / 4)
    r = np.arange(0.01, max(15.0, d_min), 0.01)
    img = (4 * np.pi * s * s * f * np.sinc(2 * np.outer(r, s))).sum(axis=1)
    rising = np.nonzero(np.diff(img) > 0)[0]
    return float(r[rising[0]]) if len(rising) else float(r[-1])


def per_residue_cc(exp_map, model_map, xyz, residue_index, n_residues, spec, radius,
                   chunk_atoms=4096):
    """CC per residue over the points within ``radius`` of its atoms (NumPy arrays).

    Atoms go in chunks of about ``chunk_atoms`` that keep each residue whole (a residue's
    atoms are consecutive), so that memory stays small for a large model."""
    g_all = spec.index_coordinates(xyz)
    rn = np.sqrt((spec.index_from_xyz**2).sum(axis=1))
    h = np.ceil(radius * rn).astype(int)
    offs = np.indices(2 * h + 1).reshape(3, -1).T - h
    n = np.asarray(spec.shape)
    size = int(np.prod(n))
    residue_index = np.asarray(residue_index, dtype=np.int64)
    starts = np.flatnonzero(np.diff(residue_index)) + 1          # first atom of each residue
    sums = np.zeros((6, n_residues))
    first = 0
    while first < len(residue_index):
        k = np.searchsorted(starts, first + chunk_atoms)
        last = int(starts[k]) if k < len(starts) else len(residue_index)
        g = g_all[first:last]
        idx = np.round(g).astype(np.int64)[:, None, :] + offs[None]          # (A,K,3)
        d = (idx - g[:, None, :]) @ spec.xyz_from_index.T
        near = (d * d).sum(axis=-1) < radius * radius
        if spec.periodic:
            idx = idx % n
        else:
            near &= np.all((idx >= 0) & (idx < n), axis=-1)
        ai, ki = np.nonzero(near)
        lin = (idx[ai, ki, 0] * n[1] + idx[ai, ki, 1]) * n[2] + idx[ai, ki, 2]
        # A point near several atoms of a residue counts once.
        key = np.unique(residue_index[first + ai] * size + lin)
        res, pt = np.divmod(key, size)
        x = exp_map.reshape(-1)[pt].astype(np.float64)
        y = model_map.reshape(-1)[pt].astype(np.float64)
        for row, w in enumerate((np.ones_like(x), x, y, x * x, y * y, x * y)):
            sums[row] += np.bincount(res, weights=w, minlength=n_residues)
        first = last
    cnt, sx, sy, sxx, syy, sxy = sums
    with np.errstate(invalid="ignore", divide="ignore"):
        cc = (cnt * sxy - sx * sy) / np.sqrt((cnt * sxx - sx * sx) * (cnt * syy - sy * sy))
    return np.where(cnt > 1, cc, np.nan)
