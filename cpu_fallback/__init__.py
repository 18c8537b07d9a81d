"""NumPy twins of the CUDA kernels in ``kernels/``: same functions, same signatures, same results.

Each function here is the reference that the matching ``.cu`` kernel is tested against.
"""
from .banded import banded_solve
from .cc_target import cc_gradient_map, cc_statistics
from .density import cutoff_radii, density_adjoint, spread_density
from .fourier import fourier_filter
from .interpolate import interpolate_at_atoms
from .lbfgs import (lbfgs_accept, lbfgs_bound_direction, lbfgs_direction, lbfgs_pair,
                    lbfgs_project_gradient, lbfgs_slope, lbfgs_step, lbfgs_trial, lbfgs_update)
from .restraints import (adp_similarity_terms, angle_terms, bond_terms, chiral_terms,
                         moved_beyond, nonbonded_terms, plane_terms, torsion_terms)

__all__ = ["spread_density", "density_adjoint", "cutoff_radii", "interpolate_at_atoms", "bond_terms",
           "angle_terms", "torsion_terms", "chiral_terms", "plane_terms", "nonbonded_terms",
           "adp_similarity_terms", "banded_solve", "cc_statistics", "cc_gradient_map",
           "lbfgs_direction", "lbfgs_update", "lbfgs_step", "lbfgs_trial", "lbfgs_accept",
           "lbfgs_pair", "fourier_filter", "moved_beyond",
           "lbfgs_project_gradient", "lbfgs_bound_direction", "lbfgs_slope"]
