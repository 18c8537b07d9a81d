"""Map preparation for real-space refinement: a box around the model, a soft mask, normalisation.

The experimental map is cut to a box covering the model plus a cushion (keeping its grid, so
NSTART/ORIGIN placement is unchanged), normalised to zero mean and unit sd inside the mask, and
carries a soft mask around the starting model: density of neighbouring, unmodelled molecules
(the shared EMD-2566 box has some) must not pull atoms, but atoms must still see density a few
Å away from where they start.  On a crystal's map the model maps hold the symmetry mates as
the map does: a cell no larger than the box along every axis (or mostly covered by it) is
taken whole, with its space group; a box cut from a larger cell carries the mates' atoms whose
density reaches the mask, and wraps around along the axes where it holds a whole period.
"""
import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np
from scipy import fft as sp_fft
from scipy.spatial import cKDTree

from .density import Copy, within_resolution
from .errors import InputError, ParameterError
from .grid import GridSpec, is_identity, space_group_operations, symmetry_contacts

log = logging.getLogger(__name__)


# Å beyond the mask within which a symmetry mate's atom adds density to it: an atom's radius
# at the model-map cutoff (about 3 Å for B near 30) and some movement.
MATE_DENSITY_REACH = 4.0

# A box cut from a crystal's cell that would hold this fraction of the cell's points or more
# is the whole cell, where its sampling lets the mates be summed on the grid: about as fast,
# and its model maps are the cell's own (no box edges in the Fourier image).
WHOLE_CELL_FRACTION = 0.75


@dataclass
class PreparedMap:
    data: np.ndarray     # (n0,n1,n2) float32, (map - mean) / sd inside the mask
    mask: np.ndarray     # (n0,n1,n2) float32 weights in [0, 1] around every start
    masks: np.ndarray    # (S,n0,n1,n2) float32: around each start alone (``mask`` is their max)
    spec: GridSpec       # the box (same grid as the input map)
    mean: float          # of the input map inside the mask
    sd: float
    # density.Copy: symmetry mates in the box; None: the whole cell's space group holds them
    copies: list = field(default_factory=list)


def enclosing_box(spec, xyz, cushion):
    """(lo, hi) grid indices of the smallest box holding ``xyz`` plus ``cushion`` Å, neither
    clipped to the map nor grown to an FFT-friendly size."""
    g = spec.index_coordinates(np.asarray(xyz, dtype=np.float64).reshape(-1, 3))
    pad = cushion * np.sqrt((spec.index_from_xyz ** 2).sum(axis=1))
    return (np.floor(g.min(axis=0) - pad).astype(int),
            np.ceil(g.max(axis=0) + pad).astype(int) + 1)


def box_indices(spec, xyz, cushion):
    """(lo, hi) grid indices of a box covering ``xyz`` plus ``cushion`` Å, FFT-friendly sizes.

    A crystal's cell (``spec.is_crystal``) is periodic: a box may wrap around it, and along an
    axis where it would need the whole cell it takes one whole period (which ``cut_box`` makes
    a periodic axis of the box); needing it along every axis, it is the whole cell (lo 0), so
    that it keeps the space group and the model's symmetry mates.  Any other map (a cryo-EM
    map, a P 1 cell) is a box whose far side is no continuation of its near side: the box is
    clipped to it and grown to an FFT-friendly size inside it where it has room, else beyond
    its edges (points that ``cut_box`` fills with zeros, outside the mask)."""
    lo, hi = enclosing_box(spec, xyz, cushion)
    shape = np.asarray(spec.shape)
    if spec.is_crystal:
        whole = hi - lo >= shape
        size = np.array([sp_fft.next_fast_len(int(n), real=True) for n in hi - lo])
        size = np.where(whole, shape, np.minimum(size, shape))
        # The whole cell where the box would need it along every axis, or where the box would
        # be most of it and the mates can be summed on the grid (no atom placed twice).
        if whole.all() or (size.prod() >= WHOLE_CELL_FRACTION * shape.prod()
                           and spec.grid_operations() is not None):
            return np.zeros(3, dtype=int), shape.copy()
        lo = np.where(whole, 0, lo)
        return lo, lo + size
    lo, hi = np.maximum(lo, 0), np.minimum(hi, shape)
    if np.any(hi <= lo):
        raise InputError("the model does not overlap the map box")
    for a in range(3):
        want = sp_fft.next_fast_len(int(hi[a] - lo[a]), real=True)
        if want > shape[a]:                  # the whole map, centred in the box
            lo[a] = -((want - shape[a]) // 2)
        else:
            lo[a] = min(max(lo[a] - (want - hi[a] + lo[a]) // 2, 0), shape[a] - want)
        hi[a] = lo[a] + want
    return lo, hi


def box_slices(spec, lo, hi):
    """(map slices, box slices): where the box [lo, hi) of a map that is no crystal's cell
    overlaps the map, in the map's indices and in the box's."""
    src = tuple(slice(max(l, 0), min(h, n)) for l, h, n in zip(lo, hi, spec.shape))
    dst = tuple(slice(s.start - l, s.stop - l) for s, l in zip(src, lo))
    return src, dst


def box_spec(spec, lo, hi):
    """The GridSpec of the box [lo, hi) of ``spec``'s grid: a crystal's whole cell keeps its
    symmetry (a box holding one period along an axis wraps there); any other box is P 1."""
    shape = tuple(int(h - l) for l, h in zip(lo, hi))
    wrap = (tuple(bool(h - l == n) for l, h, n in zip(lo, hi, spec.shape)) if spec.is_crystal
            else (False, False, False))
    whole = all(wrap) and shape == tuple(spec.shape)
    start = tuple(int(s + l) for s, l in zip(spec.start, lo))
    return GridSpec(cell=spec.cell, sampling=spec.sampling, shape=shape, start=start,
                    origin=spec.origin, spacegroup=spec.spacegroup if whole else "P 1",
                    crystal=whole, wrap=wrap)


def cut_box(data, spec, lo, hi):
    """The sub-array [lo, hi) of the map, its GridSpec, and which of its points hold map
    data: a crystal's cell wraps around (the box is periodic along the axes where it holds a
    whole period), any other map is padded with zeros and never periodic."""
    box = box_spec(spec, lo, hi)
    if spec.is_crystal:
        idx = [np.arange(lo[a], hi[a]) % spec.shape[a] for a in range(3)]
        sub = np.ascontiguousarray(data[np.ix_(*idx)], dtype=np.float32)
        covered = np.ones(sub.shape, dtype=bool)
    else:
        sub = np.zeros(box.shape, dtype=np.float32)
        src, dst = box_slices(spec, lo, hi)
        sub[dst] = data[src]
        covered = np.zeros(sub.shape, dtype=bool)
        covered[dst] = True
    return sub, box, covered


def periodic_images(spec, xyz, reach):
    """Positions of ``xyz``, its symmetry mates (on a crystal's whole cell) and their
    translates along the grid's periodic axes that lie within ``reach`` Å of the grid (the
    period whose first point is at origin_xyz along those axes)."""
    xyz = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
    wrap = np.asarray(spec.periodic_axes)
    copies = np.concatenate([xyz @ r.T + t for r, t in spec.cartesian_operations()])
    edges = spec.xyz_from_index * np.asarray(spec.shape, dtype=np.float64)[None, :]
    to_frac = np.linalg.inv(edges)
    f = (copies - spec.origin_xyz) @ to_frac.T
    f = np.where(wrap, f - np.floor(f), f)
    # A point within reach of an image differs from it by at most reach / height per axis.
    margin = reach * np.sqrt((to_frac ** 2).sum(axis=1))
    steps = [np.arange(-int(np.ceil(m)), int(np.ceil(m)) + 1) if w else np.zeros(1, dtype=int)
             for m, w in zip(margin, wrap)]
    shifts = np.stack(np.meshgrid(*steps, indexing="ij"), axis=-1).reshape(-1, 3)
    f = (f[:, None, :] + shifts[None]).reshape(-1, 3)
    f = f[np.all(((f >= -margin) & (f <= 1 + margin)) | ~wrap, axis=1)]
    return spec.origin_xyz + f @ edges.T


def mate_copies(cell, xyz, reach, wrap=(False, False, False)):
    """The symmetry mates of a crystal (``cell``, its whole-cell GridSpec) with atoms within
    ``reach`` Å of the model's: one density.Copy per operation and lattice translation, with
    those atoms (the model itself excluded).  Along the axes ``wrap`` of a box that holds a
    whole period the box adds every lattice translate itself: translates are one copy there
    (the union of their atoms), and the model's own are none.  ``xyz`` (N, 3), or (S, N, 3)
    for several starting models of one topology: an atom counts where any of them is near."""
    xyz = np.asarray(xyz, dtype=np.float64)
    n_atoms = xyz.shape[-2]
    wrap = np.asarray(wrap, dtype=bool)
    orth = cell.orth
    frac = np.linalg.inv(orth)
    found = {}
    for _, j, _, rot, t in symmetry_contacts(xyz.reshape(-1, 3), cell.cell,
                                             space_group_operations(cell.spacegroup), reach):
        # t is the operation's translation (in [0, 1) of the cell) plus a lattice translation.
        lattice = np.floor(frac @ t + 1e-6)
        kept = np.where(wrap, 0.0, lattice)            # the translate that stands for them all
        t = t - orth @ (lattice - kept)
        if is_identity(rot, t):
            continue                                        # the model itself
        near = np.unique(j % n_atoms)
        key = (np.round(rot, 6).tobytes(), np.round(frac @ t, 6).tobytes())
        if key in found:
            near = np.union1d(found[key].atoms, near)
        found[key] = Copy(rot, t, near)
    return list(found.values())


def soft_mask(spec, xyz, radius, edge):
    """Weight 1 within ``radius`` Å of any atom, falling to 0 by a cosine over ``edge`` Å.  On a
    crystal's whole cell distances are to the nearest copy of an atom: its symmetry mates and
    their lattice translates; on a box periodic along some axes, to its translates along
    those.  ``xyz`` (N, 3), or (S, N, 3) for one mask per starting model: (S, n0, n1, n2)."""
    n = spec.shape
    reach = radius + edge
    idx = np.indices(n, dtype=np.float64).reshape(3, -1).T
    pts = spec.origin_xyz + idx @ spec.xyz_from_index.T
    xyz = np.asarray(xyz, dtype=np.float64)
    sets = xyz.reshape(-1, xyz.shape[-2], 3)

    def weight(centres, at):
        if any(spec.periodic_axes):
            centres = periodic_images(spec, centres, reach)
        d, _ = cKDTree(centres).query(at, distance_upper_bound=reach, workers=-1)
        t = np.clip((d - radius) / max(edge, 1e-6), 0.0, 1.0)
        return np.where(np.isfinite(d), 0.5 * (1 + np.cos(np.pi * t)), 0.0).astype(np.float32)

    union = weight(sets.reshape(-1, 3), pts)
    if xyz.ndim == 2:
        return union.reshape(n)
    masks = np.zeros((len(sets), union.size), dtype=np.float32)
    if len(sets) == 1:
        masks[0] = union
    else:
        # Each start's mask lies inside the union's: only those points are queried again.
        near = np.flatnonzero(union > 0)
        for k, centres in enumerate(sets):
            masks[k, near] = weight(centres, pts[near])
    return masks.reshape((len(sets),) + tuple(n))


def prepare_map(map_data, xyz, cushion=5.0, mask_radius=3.0, mask_edge=2.0):
    """Box, mask and normalise ``map_data`` around the atoms ``xyz``: (N, 3), or (S, N, 3) for
    several starting models of one topology (the box and ``mask`` then cover them all, and
    ``masks`` holds each one's own)."""
    if mask_radius <= 0 or mask_edge < 0 or cushion < 0:
        raise ParameterError("mask_radius must be > 0, mask_edge and cushion >= 0")
    starts = np.asarray(xyz, dtype=np.float64)
    xyz = starts.reshape(-1, 3)
    spec = map_data.spec
    inside = spec.contains(xyz)
    if not inside.any():
        raise InputError("the model does not overlap the map: no atom lies inside its box "
                         "(check the map origin / NSTART and the model frame)")
    if not inside.all():
        log.warning("%d of %d atom positions lie outside the map box", int((~inside).sum()),
                    inside.size)
    lo, hi = box_indices(spec, xyz, cushion + mask_radius + mask_edge)
    data, box, covered = cut_box(map_data.data, spec, lo, hi)
    if box.is_crystal:
        copies = None
    elif spec.is_crystal:
        # The mates whose density reaches the mask: atoms within the mask's reach plus a
        # density radius (and a little room to move) of the model's.
        copies = mate_copies(spec, starts, mask_radius + mask_edge + MATE_DENSITY_REACH,
                             box.periodic_axes)
    else:
        copies = []
    # Each start is compared inside its own mask (the union of many shaken starts is wider
    # than any one's, and lowers the fit); the union normalises the map.
    masks = soft_mask(box, starts.reshape(-1, *starts.shape[-2:]), mask_radius,
                      mask_edge) * covered
    mask = masks.max(axis=0)
    w = mask.astype(np.float64)
    if not w.sum() > 0:
        raise InputError("the mask around the model covers no point of the map")
    mean = float((w * data).sum() / w.sum())
    sd = float(np.sqrt((w * (data - mean) ** 2).sum() / w.sum()))
    if not sd > 0:
        raise InputError("the map is flat where the model is")
    norm = ((data - mean) / sd).astype(np.float32)
    if box.is_crystal:
        where = (f"the whole cell ({box.spacegroup}, symmetry mates included)"
                 if len(box.cartesian_operations()) > 1
                 else f"the whole cell ({box.spacegroup}, periodic)")
    else:
        where = "around the model"
        if any(box.periodic_axes):
            where += ", periodic along " + "".join(
                "abc"[a] for a in range(3) if box.periodic_axes[a])
        if copies:
            where += (f", with {sum(len(c.atoms) for c in copies)} atoms of {len(copies)} "
                      "symmetry mates near it")
    each = ("" if len(masks) == 1 else
            f" (around all {len(masks)} starts; each start's own: "
            f"{int((masks > 0).sum(axis=(1, 2, 3)).mean())} on average)")
    log.info("map box %s points (%.1f x %.1f x %.1f Å) %s; mask %.1f Å + %.1f Å edge covers "
             "%d points%s", box.shape, *(box.voxel_size * np.asarray(box.shape)), where,
             mask_radius, mask_edge, int((mask > 0).sum()), each)
    return PreparedMap(data=norm, mask=mask, masks=masks, spec=box, mean=mean, sd=sd,
                       copies=copies)


def low_pass(prepared, resolution):
    """``prepared`` with its map cut to ``resolution`` Å (terms beyond it dropped on the box's
    grid, as the model map of that resolution is): the map of an early, coarse stage whose
    broad features pull a displaced model from farther than the final map's."""
    s2 = prepared.spec.s2(np)
    f = sp_fft.rfftn(prepared.data.astype(np.float64))
    f[~within_resolution(s2, resolution)] = 0.0
    data = sp_fft.irfftn(f, s=prepared.data.shape).astype(np.float32)
    return dataclasses.replace(prepared, data=data)
