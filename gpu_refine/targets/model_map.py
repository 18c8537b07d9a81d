"""Model-map correlation inside a soft mask, through the Fourier-image model map.

    T = N_atoms (1 - CC_w(image(model), map)),   CC_w weighted by the mask weights w_p
The image is the model's density at the map's resolution (``ModelMapper``), so B and occupancy
shape it and get gradients, through the density adjoint kernel:
    dCC/dx_p = w_p (dy_p / sqrt(Sxx Syy) - CC dx_p / Sxx),
with dx, dy deviations from the weighted means (their derivatives cancel because the weighted
deviations sum to zero).  N_atoms scales T like a sum over atoms, as the restraints are.
The passes over the grids are two kernels (kernels/cc_target.cu): the per-model sums in
float64 from the float32 images, and the gradient map.
Each model is compared inside the mask of its own start (``Batch.mask_index`` into
``PreparedMap.masks``).
"""
import numpy as np

from ..backend import get_backend
from ..density import DensitySettings, ModelMapper, map_in_chunks
from ..errors import ParameterError
from .base import Gradients


class ModelMapTarget:
    parameters = ("xyz", "b", "occ")

    def __init__(self, prepared, resolution, backend=None, settings=None):
        self.backend = bk = get_backend(backend)
        self.spec = prepared.spec
        self.settings = settings or DensitySettings(cutoff=1e-4)
        self.mapper = ModelMapper(self.spec, resolution, self.settings, backend=bk,
                                  copies=prepared.copies)
        xp = bk.xp
        # One mask per start (S, n0, n1, n2), kept in float32 (exact: the masks are float32):
        # with many starts and a large box the masks are the target's largest arrays.  The
        # kernels (ops.cc_statistics, cc_gradient_map) pick each model's by its mask_index.
        self.w = bk.asarray(prepared.masks, dtype=xp.float32)
        self.y = bk.asarray(prepared.data, dtype=xp.float64)
        w = self.w.astype(xp.float64)
        self.w_sum = w.sum(axis=(1, 2, 3))
        self.my = (w * self.y[None]).sum(axis=(1, 2, 3)) / self.w_sum
        self.syy = (w * (self.y[None] - self.my[:, None, None, None]) ** 2).sum(axis=(1, 2, 3))
        self.chunk = None   # models per evaluation: all, until the device runs out of memory
        self._index = None  # (mask_index on the host, on the device) of the last call
        self._weights = None   # (key, n w, -n w) of the last call (_scales)

    def _mask_index(self, batch):
        """batch.mask_index on the device, moved there only when it changes (fixed within a
        minimisation)."""
        index = batch.mask_index
        if index.size and index.max() >= self.w.shape[0]:
            raise ParameterError(f"mask_index {int(index.max())} given, but the map has "
                                 f"{self.w.shape[0]} mask(s)")
        if self._index is None or not np.array_equal(self._index[0], index):
            self._index = (index.copy(), self.backend.asarray(index, dtype=np.int32))
        return self._index[1]

    def _stats(self, image, batch, scale):
        """((B, 4) float64 on the device: CC, mx, Sxx, Sxy of each image against the map;
        (B,) scale (1 - CC))."""
        xp = self.backend.xp
        out, value = xp.empty((batch.size, 4), xp.float64), xp.empty(batch.size, xp.float64)
        self.backend.ops.cc_statistics(image, self.w, self._mask_index(batch), self.y, self.my,
                                       self.w_sum, self.syy, scale, out, value)
        return out, value

    def _scales(self, batch, weight, part):
        """(n w, -n w) (B,) on the device for the models ``part`` (a slice) of a call with
        per-model weights ``weight`` (None: 1), n the model's atoms: kept for the last
        weight array, fixed within a minimisation."""
        key = (weight, part.start, part.stop, batch.model.n_atoms)
        last = self._weights
        if last is None or last[0][0] is not weight or last[0][1:] != key[1:]:
            xp = self.backend.xp
            n = float(batch.model.n_atoms)
            w = (xp.ones(batch.size) if weight is None
                 else xp.asarray(weight, dtype=xp.float64)[part])
            self._weights = (key, n * w, -n * w)
        return self._weights[1:]

    def _chunked(self, batch, fn):
        """fn(sub-batch, its slice) over sub-batches whose model maps fit on the device (all
        at once where they do)."""
        done = [0]

        def part(sub):
            out = fn(sub, slice(done[0], done[0] + sub.size))
            done[0] += sub.size
            return out
        parts, self.chunk = map_in_chunks(self.backend, batch, part, self.chunk)
        return parts

    def fixed_b(self, batch):
        """The blur and the atoms' radii found once for ``batch``'s B (ModelMapper.fixed_b)."""
        return self.mapper.fixed_b(batch)

    def fixed_blur(self, batch, b_max):
        """The blur held while B (at most b_max) is refined (ModelMapper.fixed_blur)."""
        return self.mapper.fixed_blur(batch, b_max)

    def _target_cc(self, batch, part):
        scale = self._scales(batch, None, part)[0]
        return self._stats(self.mapper.image(batch), batch, scale)[0][:, 0]

    def value(self, batch):
        cc = self.backend.xp.concatenate(self._chunked(batch, self._target_cc))
        return batch.model.n_atoms * (1.0 - cc)

    def value_and_gradient(self, batch, wrt=("xyz",), weight=None):
        """(T, Gradients); with per-model ``weight`` (B,) (a device array, kept by the
        caller through a minimisation), (weight T, weight × gradients), weighed inside the
        kernels."""
        parts = self._chunked(batch, lambda sub, part: self._value_and_gradient(sub, wrt,
                                                                                weight, part))
        if len(parts) == 1:
            return parts[0]
        xp = self.backend.xp
        join = (lambda name: None if getattr(parts[0][1], name) is None else
                xp.concatenate([getattr(g, name) for _, g in parts]))
        return (xp.concatenate([f for f, _ in parts]),
                Gradients(xyz=join("xyz"), b=join("b"), occ=join("occ")))

    def _value_and_gradient(self, batch, wrt, weight, part):
        xp = self.backend.xp
        value_scale, gradient_scale = self._scales(batch, weight, part)
        image = self.mapper.image(batch)
        stats, value = self._stats(image, batch, value_scale)
        dmap = self.backend.ops.cc_gradient_map(image, self.w, self._mask_index(batch), self.y,
                                                self.my, self.syy, stats, gradient_scale,
                                                xp.empty_like(image))
        del image
        gx, gb, _, go = self.mapper.image_adjoint(batch, dmap)
        grads = Gradients(xyz=gx if "xyz" in wrt else None, b=gb if "b" in wrt else None,
                          occ=go if "occ" in wrt else None)
        return value, grads

    def stats(self, batch):
        cc = self.backend.xp.concatenate(self._chunked(batch, self._target_cc))
        return {"cc_target": self.backend.to_numpy(cc)}
