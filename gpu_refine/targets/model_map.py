"""Model-map correlation inside a soft mask, through the Fourier-image model map.

    T = N_atoms (1 - CC_w(image(model), map)),   CC_w weighted by the mask weights w_p
The image is the model's density at the map's resolution (``ModelMapper``), so B and occupancy
shape it and get gradients, through the density adjoint kernel:
    dCC/dx_p = w_p (dy_p / sqrt(Sxx Syy) - CC dx_p / Sxx),
with dx, dy deviations from the weighted means (their derivatives cancel because the weighted
deviations sum to zero).  N_atoms scales T like a sum over atoms, as the restraints are.
"""

from ..backend import get_backend
from ..density import DensitySettings, ModelMapper, map_in_chunks
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
        w = bk.asarray(prepared.mask, dtype=xp.float64)
        y = bk.asarray(prepared.data, dtype=xp.float64)
        self.w = w
        self.w_sum = float(w.sum())
        my = (w * y).sum() / self.w_sum
        self.dy = (y - my) * (w > 0)
        self.syy = float((w * self.dy ** 2).sum())
        self.chunk = None   # models per evaluation: all, until the device runs out of memory

    def _cc(self, image):
        """(CC (B,), dx (B,…), Sxx (B,), Sxy (B,)) of each image against the map."""
        xp = self.backend.xp
        x = image.astype(xp.float64)
        w = self.w[None]
        mx = (w * x).sum(axis=(1, 2, 3)) / self.w_sum
        dx = x - mx[:, None, None, None]
        sxx = (w * dx * dx).sum(axis=(1, 2, 3))
        sxy = (w * dx * self.dy[None]).sum(axis=(1, 2, 3))
        cc = sxy / xp.sqrt(xp.maximum(sxx, 1e-300) * self.syy)
        return cc, dx, sxx, sxy

    def _chunked(self, batch, fn):
        """fn over sub-batches whose model maps fit on the device (all at once where they do)."""
        parts, self.chunk = map_in_chunks(self.backend, batch, fn, self.chunk)
        return parts

    def _target_cc(self, batch):
        return self._cc(self.mapper.image(batch))[0]

    def value(self, batch):
        cc = self.backend.xp.concatenate(self._chunked(batch, self._target_cc))
        return batch.model.n_atoms * (1.0 - cc)

    def value_and_gradient(self, batch, wrt=("xyz",)):
        parts = self._chunked(batch, lambda sub: self._value_and_gradient(sub, wrt))
        if len(parts) == 1:
            return parts[0]
        xp = self.backend.xp
        join = (lambda name: None if getattr(parts[0][1], name) is None else
                xp.concatenate([getattr(g, name) for _, g in parts]))
        return (xp.concatenate([f for f, _ in parts]),
                Gradients(xyz=join("xyz"), b=join("b"), occ=join("occ")))

    def _value_and_gradient(self, batch, wrt):
        xp = self.backend.xp
        image = self.mapper.image(batch)
        cc, dx, sxx, _ = self._cc(image)
        del image
        n = batch.model.n_atoms
        denom = xp.sqrt(xp.maximum(sxx, 1e-300) * self.syy)
        dcc = self.w[None] * (self.dy[None] / denom[:, None, None, None]
                              - (cc / xp.maximum(sxx, 1e-300))[:, None, None, None] * dx)
        dmap = (-n * dcc).astype(batch.dtype)
        gx, gb, _, go = self.mapper.image_adjoint(batch, dmap)
        grads = Gradients(xyz=gx if "xyz" in wrt else None, b=gb if "b" in wrt else None,
                          occ=go if "occ" in wrt else None)
        return n * (1.0 - cc), grads

    def stats(self, batch):
        cc = self.backend.xp.concatenate(self._chunked(batch, self._target_cc))
        return {"cc_target": self.backend.to_numpy(cc)}
