"""Geometry of a model or batch: restraint statistics, and regularisation (T_restraints alone)."""
import logging

import numpy as np

from ..backend import get_backend
from ..errors import InputError
from ..minimize import LBFGSSettings, minimize_lbfgs
from ..model import Batch
from ..restraints.geometry import GeometryRestraints
from ..restraints.stats import geometry_statistics
from ..restraints.topology import build_topology

log = logging.getLogger(__name__)


def geometry_report(model, monlib=None, dictionaries=(), ignore_unknown=False, xyz=None,
                    backend=None, h_distances="electron", find_links=True,
                    apply_all_trans=False):
    """(topology, [statistics per model]) for ``model`` or for coordinates ``xyz`` (B,N,3) of
    its topology."""
    topology = build_topology(model, monlib=monlib, dictionaries=dictionaries,
                              ignore_unknown=ignore_unknown, h_distances=h_distances,
                              find_links=find_links, apply_all_trans=apply_all_trans)
    restraints = GeometryRestraints(topology, backend=backend, dtype=np.float64)
    coords = model.xyz[None] if xyz is None else xyz
    problems = topology.coincident(coords)
    for problem in problems:
        log.warning("%s", problem)
    # Said above: the angles at atoms that lie on each other are not numbers.
    with np.errstate(invalid="ignore" if problems else "warn"):
        return topology, geometry_statistics(restraints, coords)


def regularize(batch, restraints=None, settings=None, monlib=None):
    """Minimise T_restraints for every model of ``batch`` in place; returns the LBFGSResult."""
    bk = batch.backend
    topology = (build_topology(batch.model, monlib=monlib) if restraints is None
                else restraints.topology)
    problems = topology.coincident(bk.to_numpy(batch.xyz))
    if problems:
        raise InputError(problems[0])
    if restraints is None:
        restraints = GeometryRestraints(topology, backend=bk, dtype=batch.xyz.dtype)
    shape = batch.xyz.shape

    def fg(x):
        f, g = restraints.energy_and_gradient(x.reshape(shape))
        return f, g.reshape(shape[0], -1)

    result = minimize_lbfgs(fg, batch.xyz.reshape(shape[0], -1),
                            settings or LBFGSSettings(max_iterations=300, max_step=0.3),
                            backend=bk)
    batch.xyz[...] = result.x.reshape(shape)
    log.info("regularised %d models: %d-%d iterations, %d evaluations", shape[0],
             int(result.iterations.min()), int(result.iterations.max()), result.n_evaluations)
    return result


def shake_shifts(n_models, n_atoms, rms, seed=0):
    """(n_models, n_atoms, 3) Gaussian shifts, each model's scaled to exactly ``rms`` Å rms
    (drawn model by model, so the first model's shifts do not depend on ``n_models``)."""
    shifts = np.random.default_rng(seed).normal(size=(n_models, n_atoms, 3))
    shifts *= rms / np.sqrt((shifts ** 2).sum(axis=(1, 2), keepdims=True) / n_atoms)
    return shifts


def shaken_batch(model, n_models, rms, seed=0, backend=None, dtype=np.float32):
    """``n_models`` copies of ``model`` with Gaussian shifts scaled to exactly ``rms`` Å each."""
    bk = get_backend(backend)
    batch = Batch.from_model(model, n_models, backend=bk, dtype=dtype)
    shifts = shake_shifts(n_models, model.n_atoms, rms, seed)
    batch.xyz[...] = bk.asarray(model.xyz[None] + shifts, dtype=dtype)
    return batch
