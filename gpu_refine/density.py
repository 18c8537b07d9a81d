"""Model maps for a batch of models: exact atomic density, its Fourier image at a resolution,
and the adjoint that turns a gradient map into per-atom gradients.

Written once for any array module; the per-atom work is done by the backend's kernel set
(``spread_density`` / ``density_adjoint``).  Settings follow gemmi's DensityCalculator: a
per-atom cutoff radius where the atom's density falls to ``cutoff``, an optional blur that is
removed again in Fourier space, symmetry mates added for crystal cells (the map summed over
the space group on the grid, as gemmi's symmetrize_sum, where the sampling allows).
"""
import contextlib
import logging
from dataclasses import dataclass

import numpy as np

from cpu_fallback import cutoff_radii

from .backend import get_backend
from .errors import InputError, ParameterError
from .grid import is_identity
from .scattering import form_factor_table

log = logging.getLogger(__name__)

U_TO_B = 8 * np.pi**2


def lowest_b(xp, batch):
    """The smallest B of ``batch``'s atoms, an anisotropic atom's taken along its narrowest
    axis (8pi² times a lower bound on U's smallest eigenvalue, by Gershgorin's discs): the
    blur chosen from it keeps every atom's Gaussian positive, also where a deposited U is
    not positive-definite."""
    b_min = float(xp.min(batch.b)) if batch.b.size else 0.0
    if batch.u is None or not batch.model.is_aniso.any():
        return b_min
    u = batch.u[:, xp.asarray(batch.model.is_aniso)]
    off = xp.abs(u[..., 3:])
    disc = u[..., :3] - xp.stack([off[..., 0] + off[..., 1], off[..., 0] + off[..., 2],
                                  off[..., 1] + off[..., 2]], axis=-1)
    return min(b_min, U_TO_B * float(xp.min(disc)))


def within_resolution(s2, resolution):
    """Fourier terms of |s|² ``s2`` inside the sphere of ``resolution`` Å, those on it
    included on every CPU (grids of d/3 have terms exactly there)."""
    return s2 <= (1.0 + 1e-9) / resolution**2


def refmac_blur(spacing, b_min):
    """Blur that makes the sampling adequate, as gemmi's set_refmac_compatible_blur (≥ 0)."""
    return max(0.0, U_TO_B / 1.1 * spacing**2 - b_min)


@dataclass
class DensitySettings:
    table: str = "electron"     # electron | xray
    blur: float = None          # Å²; None: gemmi's Refmac-compatible choice
    cutoff: float = 1e-5        # density level that sets each atom's radius
    dtype: str = "float32"      # of the grids


@dataclass
class Copy:
    """Atoms of the model placed again by a Cartesian operation: x' = R x + t.  ``atoms``
    (sorted, unique) selects them; None: every atom."""
    rot: np.ndarray
    shift: np.ndarray
    atoms: np.ndarray = None


def crystal_copies(spec):
    """Every atom's symmetry mates on a crystal's whole cell (every operation but the
    identity); none on any other grid.  Mates past the cell fold back onto it."""
    return [Copy(np.asarray(r), np.asarray(t)) for r, t in spec.cartesian_operations()
            if not is_identity(r, t)]


def split_on_oom(backend, n, fn, chunk=None):
    """Call fn(slice) over range(n), halving the slice length when the device runs out of
    memory.  Returns the slice length that went through where memory ran out, else the
    ``chunk`` given: a caller that keeps it must not split a later, larger batch into parts
    of this one's size (a run's 127-model step left every later 128-model evaluation in two
    parts)."""
    given, chunk = chunk, chunk or n
    start = 0
    while start < n:
        sl = slice(start, min(n, start + chunk))
        try:
            fn(sl)
        except Exception as exc:
            if not backend.is_out_of_memory(exc) or chunk == 1:
                raise
            backend.free_memory()
            chunk = given = max(1, chunk // 2)
            log.warning("device memory exhausted; continuing with %d models at a time", chunk)
            continue
        start = sl.stop
    return given


def map_in_chunks(backend, batch, fn, chunk=None):
    """[fn(sub-batch)] over consecutive sub-batches of ``batch``, each of ``chunk`` models (the
    whole batch if None), halved while the device runs out of memory.  Returns (results,
    chunk that went through): a caller keeps the chunk for its next call."""
    parts = []

    def part(sl):
        whole = sl.start == 0 and sl.stop == batch.size
        parts.append(fn(batch if whole else batch.subset(sl)))
    chunk = split_on_oom(backend, batch.size, part, chunk)
    return parts, chunk


class ModelMapper:
    """Model maps of a Batch on one grid, and the gradients of a map target through them.

    mapper = ModelMapper(spec, resolution=3.2, settings=DensitySettings(table="electron"))
    image = mapper.image(batch)                  # (B, n0, n1, n2) at resolution d
    g_xyz, g_b, g_u, g_occ = mapper.image_adjoint(batch, dT_dimage)
    """

    def __init__(self, spec, resolution=None, settings=None, backend=None, copies=None):
        self.spec = spec
        self.resolution = resolution
        self.settings = settings or DensitySettings()
        self.backend = get_backend(backend)
        if resolution is not None and not (0.3 <= resolution <= 100):
            raise ParameterError(f"resolution={resolution} Å is outside 0.3-100 Å")
        # What the map holds besides the model.  By default, on a crystal's cell, the symmetry
        # mates: a sum of the model's map over the space group on the grid (one gather per
        # operation instead of every atom again), or copies of the atoms where the sampling
        # does not suit the group.  Given: copies of atoms (mates near a box cut from a cell,
        # mapprep.mate_copies).
        self._symmetry = None
        if copies is None:
            sources = spec.symmetry_sources()
            if sources is not None:
                self._symmetry = [self.backend.asarray(src) for src in sources]
            copies = crystal_copies(spec) if sources is None else []
        self.copies = list(copies)
        self._filter = None
        self._types = None   # (model, stype, coefs) of the last model seen
        self._held = None    # (b, u, blur, radii, their max) while fixed_b holds them
        self._held_blur = None   # (model, blur, radii's max then) while fixed_blur holds it

    # -- per-batch inputs -------------------------------------------------------------------
    def _type_arrays(self, model):
        """Scattering-type index per atom and the (T,2,5) table, on the host and on the
        device: computed and moved once per model (not an upload per evaluation)."""
        if self._types is None or self._types[0] is not model:
            names, stype = np.unique(model.element, return_inverse=True)
            try:
                coefs = form_factor_table(list(names), self.settings.table)
            except Exception as exc:
                raise InputError(f"no form factors for the elements of this model: {exc}") from None
            stype = stype.astype(np.int32)
            bk = self.backend
            self._types = (model, stype, coefs, bk.asarray(stype), bk.asarray(coefs))
        return self._types[1:]

    @contextlib.contextmanager
    def fixed_b(self, batch):
        """Within, ``batch``'s B and U (the very arrays) do not change: the blur and the
        atoms' radii are found once, not in each evaluation (each a device→host sync on a
        GPU), for any batch that shares those arrays (a sites refinement's views)."""
        blur = self.blur_for(batch)
        radius, rmax = self._radii(batch, blur, measure=True)
        self._held = (batch.b, batch.u, blur, radius, rmax)
        try:
            yield
        finally:
            self._held = None

    @contextlib.contextmanager
    def fixed_blur(self, batch, b_max):
        """Within, B changes (a B refinement of ``batch``'s model, B at most ``b_max``) but
        the blur stays the one of the B now: each evaluation's radii are found on the device,
        and the launches are sized for the widest atom B can make, with no device→host sync.
        (A B that falls below today's lowest is sampled a little less finely.)"""
        blur = self.blur_for(batch)
        rmax = self._radii(batch, blur, measure=True)[1]
        _, coefs = self._type_arrays(batch.model)[:2]
        widest = cutoff_radii(np.full((1, len(coefs)), float(b_max)), None, None,
                              np.arange(len(coefs)), coefs, blur, self.settings.cutoff,
                              np.empty((1, len(coefs))))
        self._held_blur = (batch.model, blur, max(rmax, float(widest.max())))
        try:
            yield
        finally:
            self._held_blur = None

    def _holds(self, batch):
        h = self._held
        return h is not None and batch.b is h[0] and batch.u is h[1]

    def _holds_blur(self, batch):
        return self._held_blur is not None and self._held_blur[0] is batch.model

    def blur_for(self, batch):
        if self._holds(batch):
            return self._held[2]
        if self._holds_blur(batch):
            return self._held_blur[1]
        if self.settings.blur is not None:
            return float(self.settings.blur)
        spacing = float(min(self.spec.voxel_size))
        return refmac_blur(spacing, lowest_b(self.backend.xp, batch))

    def _radii(self, batch, blur, measure):
        """(each atom's radius (B,N) on the device, their maximum on the host, or None
        without ``measure``: a device→host sync)."""
        xp = self.backend.xp
        _, _, stype, coefs = self._type_arrays(batch.model)
        aniso = batch.model.is_aniso if batch.u is not None else None
        radius = self.backend.ops.cutoff_radii(batch.b, batch.u, aniso, stype, coefs, blur,
                                               self.settings.cutoff,
                                               xp.empty(batch.b.shape, batch.dtype))
        if not measure:
            return radius, None
        rmax = float(radius.max()) if radius.size else 0.0
        if not np.isfinite(rmax):
            raise InputError("B + blur must be positive for every atom")
        return radius, rmax

    def _inputs(self, batch, blur, with_max=False):
        """Kernel inputs, the copies' atoms after the model's: (xyz, b, u, is_aniso, occ,
        stype, coefs, radius), and with ``with_max`` the radii's maximum (host float)."""
        xp = self.backend.xp
        stype, coefs, stype_dev, coefs_dev = self._type_arrays(batch.model)
        aniso = batch.model.is_aniso if batch.u is not None else None
        if self._holds(batch) and blur == self._held[2]:
            radius, rmax = self._held[3:]
        elif self._holds_blur(batch) and blur == self._held_blur[1]:
            radius, rmax = self._radii(batch, blur, measure=False)[0], self._held_blur[2]
        else:
            radius, rmax = self._radii(batch, blur, measure=True)
        xyz, u, b, occ = batch.xyz, batch.u, batch.b, batch.occ
        tail = (rmax,) if with_max else ()
        if not self.copies:
            return (xyz, b, u, aniso, occ, stype_dev, coefs_dev, radius) + tail
        xyz_parts, u_parts, b_parts, occ_parts, r_parts = [xyz], [u], [b], [occ], [radius]
        stype_parts, aniso_parts = [stype], [aniso]
        for c in self.copies:
            sel = slice(None) if c.atoms is None else xp.asarray(c.atoms)
            rot = xp.asarray(c.rot, dtype=batch.dtype)
            xyz_parts.append(xyz[:, sel] @ rot.T + xp.asarray(c.shift, dtype=batch.dtype))
            if u is not None:
                u_parts.append(_rotate_u(xp, u[:, sel], rot))
            b_parts.append(b[:, sel])
            occ_parts.append(occ[:, sel])
            r_parts.append(radius[:, sel])
            host = slice(None) if c.atoms is None else c.atoms
            stype_parts.append(stype[host])
            aniso_parts.append(None if aniso is None else aniso[host])
        join = (lambda parts: xp.concatenate(parts, axis=1))
        return (join(xyz_parts), join(b_parts), None if u is None else join(u_parts),
                None if aniso is None else np.concatenate(aniso_parts), join(occ_parts),
                np.concatenate(stype_parts), coefs, join(r_parts)) + tail

    # -- maps -------------------------------------------------------------------------------
    def exact(self, batch, blur=None):
        """Atomic density (blurred by ``blur``) of every batch member: (B, n0, n1, n2)."""
        blur = self.blur_for(batch) if blur is None else blur
        xp = self.backend.xp
        out = xp.empty((batch.size,) + tuple(self.spec.shape), dtype=self.settings.dtype)
        xyz, b, u, aniso, occ, stype, coefs, radius, rmax = self._inputs(batch, blur, True)
        self.backend.ops.spread_density(xyz, b, u, aniso, occ, stype, coefs, radius,
                                        self.spec.geom, blur, self.spec.periodic_axes, out,
                                        radius_max=rmax)
        return self.symmetrize(out)

    def symmetrize(self, maps):
        """Sum of maps (B, n0, n1, n2) over the crystal's space group where the mapper does
        the mates on the grid; the maps themselves otherwise.  The sum over a group is its
        own adjoint (the inverse of every operation is in the group), so gradients go
        through the same call."""
        if not self._symmetry:
            return maps
        flat = maps.reshape(maps.shape[0], -1)
        total = flat.copy()
        for src in self._symmetry:
            total += flat[:, src]
        return total.reshape(maps.shape)

    def fourier_filter(self, blur, dtype):
        """Real filter on rfft terms: 1 inside the resolution sphere (times the un-blur), else
        0, and the inverse FFT's 1/N (a pass of its own otherwise), in the grids' precision.
        Kept for the last blur: a refinement applies the same one many times."""
        key = (blur, np.dtype(dtype))
        if self._filter is None or self._filter[0] != key:
            xp = self.backend.xp
            s2 = self.spec.s2(xp)
            keep = (within_resolution(s2, self.resolution) if self.resolution
                    else xp.ones(s2.shape, bool))
            n = float(np.prod(self.spec.shape))
            self._filter = (key, xp.where(keep, xp.exp(blur * s2 / 4.0) / n, 0.0).astype(dtype))
        return self._filter[1]

    def apply_filter(self, maps, blur):
        """Fourier image of blurred densities: drop terms beyond d, undo the blur (batched FFT;
        the inverse unscaled, its 1/N in the filter)."""
        return self.backend.ops.fourier_filter(maps, self.fourier_filter(blur, maps.dtype))

    def image(self, batch):
        """Model map at the mapper's resolution for each batch member: (B, n0, n1, n2)."""
        blur = self.blur_for(batch)
        return self.apply_filter(self.exact(batch, blur), blur)

    def image_adjoint(self, batch, dmap):
        """Per-atom gradients of T given dT/d(image) (B, n0, n1, n2).

        The Fourier filter is real and even, hence self-adjoint: dT/d(exact) is the filtered
        dT/d(image).  Returns (g_xyz, g_b, g_u or None, g_occ) for the batch's atoms.
        """
        blur = self.blur_for(batch)
        return self.exact_adjoint(batch, self.apply_filter(dmap, blur), blur)

    def exact_adjoint(self, batch, dmap, blur=None):
        """Per-atom gradients of T given dT/d(exact blurred density)."""
        blur = self.blur_for(batch) if blur is None else blur
        xp = self.backend.xp
        xyz, b, u, aniso, occ, stype, coefs, radius, rmax = self._inputs(batch, blur, True)
        dmap = self.symmetrize(self.backend.asarray(dmap, dtype=batch.dtype))
        out = self.backend.ops.density_adjoint(xyz, b, u, aniso, occ, stype, coefs, radius,
                                               self.spec.geom, blur, self.spec.periodic_axes,
                                               dmap, radius_max=rmax)
        gx, gb, gu, go = out
        n = batch.model.n_atoms
        if self.copies:
            # A copy's atom is R x + t: its gradient maps back through R^T, U's through R.
            gx, gb, gu, go = (a[:, :n].copy() for a in out)
            start = n
            for c in self.copies:
                m = n if c.atoms is None else len(c.atoms)
                part = slice(start, start + m)
                sel = slice(None) if c.atoms is None else xp.asarray(c.atoms)
                rot = xp.asarray(c.rot, dtype=batch.dtype)
                gx[:, sel] += out[0][:, part] @ rot
                gb[:, sel] += out[1][:, part]
                go[:, sel] += out[3][:, part]
                if batch.u is not None:
                    gu[:, sel] += _rotate_u_gradient(xp, out[2][:, part], rot)
                start += m
        return gx, gb, (gu if batch.u is not None else None), go


def _sym6_to_mat(xp, u):
    m = xp.stack([u[..., 0], u[..., 3], u[..., 4], u[..., 3], u[..., 1], u[..., 5],
                  u[..., 4], u[..., 5], u[..., 2]], axis=-1)
    return m.reshape(u.shape[:-1] + (3, 3))


def _rotate_u(xp, u, r):
    """U' = R U R^T for (…,6) tensors."""
    m = r @ _sym6_to_mat(xp, u) @ r.T
    return xp.stack([m[..., 0, 0], m[..., 1, 1], m[..., 2, 2], m[..., 0, 1], m[..., 0, 2],
                     m[..., 1, 2]], axis=-1)


def _rotate_u_gradient(xp, g, r):
    """Gradient w.r.t. U given the gradient w.r.t. U' = R U R^T (6-vector convention:
    off-diagonal entries count both symmetric elements)."""
    half = xp.asarray([1, 1, 1, 0.5, 0.5, 0.5], dtype=g.dtype)
    gm = r.T @ _sym6_to_mat(xp, g * half) @ r
    return xp.stack([gm[..., 0, 0], gm[..., 1, 1], gm[..., 2, 2], 2 * gm[..., 0, 1],
                     2 * gm[..., 0, 2], 2 * gm[..., 1, 2]], axis=-1)
