"""Batched Langevin dynamics at a falling temperature: simulated annealing of B models at once.

Overdamped (Brownian) dynamics on any energy T(x) with gradient, for B independent
trajectories of (B, P) parameters, written once with ``xp``:
    x <- x - mu grad T(x) + sqrt(2 mu kT) xi,    xi ~ N(0, 1) per parameter and step,
whose samples at a constant kT follow exp(-T / kT) (for small steps).  T is in the units of
the restraints (sum of (delta / sigma)^2), so kT = 1 lets a bond fluctuate by about
sigma / sqrt(2).  The temperature falls linearly from ``t_start`` to ``t_end``.

Each trajectory draws its noise from its own stream, seeded by (seed, member): member k of a
batch follows the same path whatever else the batch holds, a run with one seed is
reproducible, and B members are B different trajectories.  The noise is drawn on the host
(NumPy's generator: the same numbers on every backend) and moved to the device once a step.
"""
from dataclasses import dataclass

import numpy as np

from .errors import ParameterError


@dataclass
class LangevinSettings:
    steps: int = 300
    t_start: float = 2.0       # kT at the first step, in restraint units
    t_end: float = 0.0         # kT at the last step
    mobility: float = 1e-4     # mu = dt / gamma, Å² per unit of T and step
    max_step: float = 0.2      # Å: no coordinate moves farther in one step (a stiff start)
    seed: int = 0

    def check(self):
        if int(self.steps) < 1:
            raise ParameterError(f"annealing steps must be at least 1, not {self.steps}")
        for name in ("t_start", "t_end"):
            if not (np.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ParameterError(f"annealing {name} must be a temperature >= 0")
        if not (self.mobility > 0 and self.max_step > 0):
            raise ParameterError("annealing mobility and max_step must be > 0")
        return self


@dataclass
class LangevinResult:
    x: object              # (B, P) the last state of each trajectory
    f: object              # (B,) its energy at the last evaluation
    temperatures: np.ndarray


def langevin(fg, x0, settings, xp=np, members=None):
    """Run ``settings.steps`` steps of every trajectory from ``x0`` (B, P).  ``fg(x)`` returns
    (T (B,), grad (B, P)); ``members`` (B ints) names each trajectory's noise stream (default
    0 … B-1)."""
    s = settings.check()
    x = x0.copy()
    n_models, n_par = x.shape
    members = range(n_models) if members is None else members
    streams = [np.random.default_rng([int(s.seed), int(m)]) for m in members]
    temperatures = np.linspace(s.t_start, s.t_end, int(s.steps))
    f = None
    for kt in temperatures:
        f, g = fg(x)
        dx = -s.mobility * g.astype(xp.float64)
        if kt > 0:
            noise = np.stack([r.standard_normal(n_par) for r in streams])
            dx = dx + np.sqrt(2.0 * s.mobility * kt) * xp.asarray(noise)
        # A stiff start (a clash, a stretched bond) must not throw an atom across the model.
        largest = xp.abs(dx).max(axis=1, keepdims=True)
        dx = dx * xp.minimum(1.0, s.max_step / xp.maximum(largest, 1e-300))
        x = x + dx.astype(x.dtype)
    return LangevinResult(x=x, f=f, temperatures=temperatures)
