"""Grid geometry: where grid point (i, j, k) lies in Å, for a full unit cell or a box in it.

Arrays are indexed [i, j, k] along the cell axes a, b, c (gemmi's order).  Point (i, j, k) is at
``origin + orth · ((start + (i, j, k)) / sampling)``, where ``sampling`` is the number of grid
points per cell edge (MRC MX, MY, MZ), ``start`` the index of the first stored point (MRC NSTART)
and ``origin`` a Cartesian shift in Å (MRC ORIGIN).  A grid that covers the whole cell is periodic;
a box cut from a map says along which axes it wraps around (``wrap``).
"""
import itertools
from dataclasses import dataclass

import gemmi
import numpy as np
from scipy import fft as sp_fft
from scipy.spatial import cKDTree


@dataclass(frozen=True)
class GridSpec:
    cell: tuple          # (a, b, c, alpha, beta, gamma), Å and degrees
    sampling: tuple      # points per cell edge
    shape: tuple         # stored points along a, b, c
    start: tuple = (0, 0, 0)
    origin: tuple = (0.0, 0.0, 0.0)
    spacegroup: str = "P 1"
    crystal: bool = None   # a crystal's cell; None: where the space group is not P 1
    wrap: tuple = None     # per axis, whether index n is index 0 again; None: ``periodic``

    @property
    def periodic(self):
        return tuple(self.shape) == tuple(self.sampling)

    @property
    def periodic_axes(self):
        """Per axis, whether density and interpolation wrap around the grid's faces: where
        the grid holds a whole period of a crystal along that axis."""
        if self.wrap is not None:
            return tuple(bool(w) for w in self.wrap)
        return (self.periodic,) * 3

    @property
    def is_crystal(self):
        """A crystal's whole cell: periodic, with a space group other than P 1 or marked
        ``crystal`` (as a P 1 crystal's map from its MTZ) — not a box such as a cryo-EM map."""
        if not self.periodic:
            return False
        if self.crystal is not None:
            return bool(self.crystal)
        return (self.spacegroup or "P 1").replace(" ", "") != "P1"

    def cartesian_operations(self):
        """Cartesian (R, t) of each space-group operation of a crystal grid (centring
        included); the identity alone for any other grid."""
        if not self.is_crystal:
            return [(np.eye(3), np.zeros(3))]
        orth = self.orth
        frac = np.linalg.inv(orth)
        return [(orth @ rot @ frac, orth @ tran)
                for rot, tran in space_group_operations(self.spacegroup)]

    def grid_operations(self):
        """Each space-group operation but the identity as integer (M, s) acting on cell grid
        indices, c' = M c + s (mod sampling), for a crystal grid whose sampling suits its
        space group; None where an operation takes grid points off the grid, or for any other
        grid."""
        if not self.is_crystal:
            return None
        n = np.asarray(self.sampling, dtype=np.float64)
        ops = []
        for rot, tran in space_group_operations(self.spacegroup):
            if is_identity(rot, tran):
                continue
            # c' = N (R c/N + t): integral for every c only if R_ab N_a/N_b and N_a t_a are.
            m = rot * n[:, None] / n[None, :]
            shift = tran * n
            if not (np.allclose(m, np.round(m)) and np.allclose(shift, np.round(shift))):
                return None
            ops.append((np.round(m).astype(np.int64), np.round(shift).astype(np.int64)))
        return ops

    def symmetry_sources(self):
        """For each operation g of ``grid_operations``, the flat index of g(p) for every
        stored point p of a crystal's whole cell, so that the sum of a map over the space
        group is a gather per operation; None where ``grid_operations`` is None."""
        ops = self.grid_operations()
        if ops is None:
            return None
        n = np.asarray(self.shape, dtype=np.int64)
        start = np.asarray(self.start, dtype=np.int64)
        dtype = np.int32 if n.prod() < 2**31 else np.int64
        strides = np.array([n[1] * n[2], n[2], 1], dtype=np.int64)
        # Cell index of each stored point along each axis, shaped to broadcast over the grid.
        axis_index = [(np.arange(n[b]) + start[b]).reshape([-1 if a == b else 1 for a in range(3)])
                      for b in range(3)]
        sources = []
        for m, shift in ops:
            # Each output axis depends only on the input axes its row of M names (one or two
            # for every crystallographic setting): small terms, one broadcast sum per operation.
            flat = 0
            for a in range(3):
                c = shift[a] - start[a] + sum(m[a, b] * axis_index[b] for b in range(3) if m[a, b])
                flat = flat + (c % n[a] * strides[a]).astype(dtype)
            sources.append(np.broadcast_to(flat, tuple(n)).reshape(-1).astype(dtype, copy=False))
        return sources

    @property
    def unit_cell(self):
        return gemmi.UnitCell(*self.cell)

    @property
    def orth(self):
        return np.array(self.unit_cell.orth.mat.tolist(), dtype=np.float64)

    @property
    def xyz_from_index(self):
        return self.orth / np.asarray(self.sampling, dtype=np.float64)[None, :]

    @property
    def index_from_xyz(self):
        return np.linalg.inv(self.xyz_from_index)

    @property
    def origin_xyz(self):
        """Cartesian position of stored point (0, 0, 0)."""
        return np.asarray(self.origin, dtype=np.float64) + self.xyz_from_index @ np.asarray(
            self.start, dtype=np.float64)

    @property
    def geom(self):
        """The 21 numbers the kernels take: index_from_xyz, xyz_from_index, origin."""
        return np.concatenate([self.index_from_xyz.ravel(), self.xyz_from_index.ravel(),
                               self.origin_xyz])

    @property
    def voxel_size(self):
        return np.asarray(self.cell[:3], dtype=np.float64) / np.asarray(self.sampling)

    def index_coordinates(self, xyz):
        """Fractional grid indices of Cartesian positions (..., 3)."""
        return (np.asarray(xyz, dtype=np.float64) - self.origin_xyz) @ self.index_from_xyz.T

    def contains(self, xyz, margin=0.0, wrap=None):
        """Boolean per position: inside the stored box.  A periodic crystal grid (space group
        other than P 1) contains everything; a P 1 box, as cryo-EM maps are, only its own box."""
        xyz = np.asarray(xyz, dtype=np.float64)
        if wrap if wrap is not None else self.is_crystal:
            return np.ones(xyz.shape[:-1], dtype=bool)
        g = self.index_coordinates(xyz)
        m = margin * np.sqrt((self.index_from_xyz**2).sum(axis=1))
        return np.all((g >= m) & (g <= np.asarray(self.shape) - 1 - m), axis=-1)

    def s2(self, xp=np, rfft=True):
        """|s|² (Å⁻²) of every Fourier term of this grid treated as one periodic cell."""
        n = self.shape
        freqs = [xp.fft.fftfreq(n[0], 1.0 / n[0]), xp.fft.fftfreq(n[1], 1.0 / n[1]),
                 xp.fft.rfftfreq(n[2], 1.0 / n[2]) if rfft else xp.fft.fftfreq(n[2], 1.0 / n[2])]
        # Reciprocal basis of the box: the box edges are shape/sampling of the cell edges.
        box = self.orth * (np.asarray(n, dtype=np.float64) / np.asarray(self.sampling))[None, :]
        rec = xp.asarray(np.linalg.inv(box).T)   # s = rec @ (h, k, l)
        h = xp.stack(xp.meshgrid(*freqs, indexing="ij"), axis=-1)
        s = h @ rec.T
        return (s * s).sum(axis=-1)


def is_identity(rot, shift):
    """Whether the Cartesian operation (R, t) leaves every position where it is."""
    return bool(np.allclose(rot, np.eye(3)) and np.allclose(shift, 0.0))


def space_group_operations(spacegroup):
    """Fractional (R, t) of every operation of a space group (centring included)."""
    return [(np.array(op.rot, dtype=np.float64) / op.DEN,
             np.array(op.tran, dtype=np.float64) / op.DEN)
            for op in gemmi.SpaceGroup(spacegroup).operations()]


def symmetry_contacts(xyz, cell, operations, radius):
    """Contacts within ``radius`` Å between positions (N,3) and their symmetry mates in a
    crystal of ``cell`` (a, b, c, alpha, beta, gamma) with fractional ``operations``: yields,
    for each image (an operation and a lattice shift, the identity itself left out) that has
    any, the positions i, the mates' positions j, their distances, and the image's Cartesian
    R and t (the mate of j at R x_j + t)."""
    uc = gemmi.UnitCell(*cell)
    orth = np.array(uc.orth.mat.tolist())
    frac = np.array(uc.frac.mat.tolist())
    xyz = np.asarray(xyz, dtype=np.float64)
    f = xyz @ frac.T
    reach = radius * np.sqrt((frac ** 2).sum(axis=1))   # the radius in cell fractions
    tree = cKDTree(xyz)
    near_lo, near_hi = xyz.min(axis=0) - radius, xyz.max(axis=0) + radius
    for rot, tran in operations:
        g = f @ rot.T + tran
        lo = np.floor(f.min(axis=0) - g.max(axis=0) - reach).astype(int)
        hi = np.ceil(f.max(axis=0) - g.min(axis=0) + reach).astype(int)
        identity = np.allclose(rot, np.eye(3)) and np.allclose(tran, 0)
        r_cart = orth @ rot @ frac
        for shift in itertools.product(*(range(a, b + 1) for a, b in zip(lo, hi))):
            if identity and not any(shift):
                continue
            t_cart = orth @ (tran + np.asarray(shift, dtype=np.float64))
            image = xyz @ r_cart.T + t_cart
            # Only mates inside the model's bounding box (plus the radius) can be near it.
            near = np.nonzero(((image >= near_lo) & (image <= near_hi)).all(axis=1))[0]
            if not len(near):
                continue
            hits = tree.sparse_distance_matrix(cKDTree(image[near]), radius,
                                               output_type="ndarray")
            if len(hits):
                yield hits["i"], near[hits["j"]], hits["v"], r_cart, t_cart


def box_around(xyz, spacing, padding=5.0):
    """A periodic P1 box grid around positions, sampling at most ``spacing`` Å, FFT-friendly."""
    xyz = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
    lo = xyz.min(axis=0) - padding
    extent = xyz.max(axis=0) + padding - lo
    shape = tuple(int(sp_fft.next_fast_len(int(np.ceil(e / spacing)), real=True)) for e in extent)
    # Keep the requested spacing; the box grows to a size that FFTs well.
    cell = tuple(float(n * spacing) for n in shape) + (90.0, 90.0, 90.0)
    return GridSpec(cell=cell, sampling=shape, shape=shape, origin=tuple(lo))

