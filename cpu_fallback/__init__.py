"""NumPy twins of the CUDA kernels in ``kernels/``: same functions, same signatures, same results.

Each function here is the reference that the matching ``.cu`` kernel is tested against.
"""
from .density import density_adjoint, spread_density
from .interpolate import interpolate_at_atoms

__all__ = ["spread_density", "density_adjoint", "interpolate_at_atoms"]
