"""Map value at atom centres (phenix.real_space_refine's "simple" target).

    T = -sum_i w_i rho(x_i),   w_i = occ_i Z_i / mean(Z)
rho is the normalised experimental map, interpolated tricubically (Catmull-Rom) with analytic
gradients; Z, the atomic number, stands for each atom's scattering strength.  B and occupancy do
not enter a map-value target, so it refines sites only.
"""
import contextlib

import gemmi
import numpy as np

from ..backend import get_backend
from ..errors import ParameterError
from .base import Gradients


class MapValueTarget:
    parameters = ("xyz",)

    def __init__(self, prepared, model, backend=None, order=3):
        self.backend = bk = get_backend(backend)
        self.spec = prepared.spec
        self.maps = bk.asarray(prepared.data[None], dtype=np.float32)
        z = np.array([gemmi.Element(e).atomic_number for e in model.element], dtype=np.float64)
        self.strength = bk.asarray(z / z.mean())
        if order not in (1, 3):
            raise ParameterError("interpolation order must be 1 or 3")
        self.order = order

    def _interpolate(self, batch):
        bk = self.backend
        xp = bk.xp
        index = xp.zeros(batch.size, dtype=xp.int32)
        maps = self.maps.astype(batch.dtype, copy=False)
        return bk.ops.interpolate_at_atoms(maps, index, batch.xyz, self.spec.geom,
                                           self.spec.periodic_axes, self.order)

    def _weights(self, batch):
        return self.strength.astype(batch.dtype)[None] * batch.occ

    def value_and_gradient(self, batch, wrt=("xyz",), weight=None):
        if set(wrt) - set(self.parameters):
            raise ParameterError("the map-value target refines sites only")
        xp = self.backend.xp
        value, grad = self._interpolate(batch)
        w = self._weights(batch)
        if weight is not None:
            w = w * xp.asarray(weight, dtype=w.dtype)[:, None]
        f = -(w.astype(xp.float64) * value).sum(axis=1)
        return f, Gradients(xyz=-(w[..., None] * grad))

    def fixed_b(self, batch):
        """Nothing here depends on B alone."""
        return contextlib.nullcontext()

    def value(self, batch):
        return self.value_and_gradient(batch)[0]

    def stats(self, batch):
        value, _ = self._interpolate(batch)
        bk = self.backend
        return {"mean_map_value": bk.to_numpy(value.astype(bk.xp.float64).mean(axis=1))}
