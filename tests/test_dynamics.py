"""Batched Langevin dynamics (simulated annealing): reproducible, one stream per member, the
Boltzmann distribution at a constant temperature, the minimum when cooled."""
import numpy as np
import pytest

from gpu_refine.dynamics import LangevinSettings, langevin
from gpu_refine.errors import ParameterError


def _quadratic(xp, k, centre):
    """T = sum k (x - centre)^2 per model, and its gradient."""
    def fg(x):
        d = x - centre
        return (k * d * d).sum(axis=1), 2.0 * k * d
    return fg


def test_a_seed_replays_and_members_differ(backend, rng):
    xp = backend.xp
    centre = rng.normal(size=(1, 30))
    fg = _quadratic(xp, 5.0, xp.asarray(centre))
    x0 = xp.asarray(np.zeros((3, 30)))
    s = LangevinSettings(steps=50, t_start=1.0, t_end=0.2, mobility=1e-2, seed=7)
    a = backend.to_numpy(langevin(fg, x0, s, xp).x)
    b = backend.to_numpy(langevin(fg, x0, s, xp).x)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a[0], a[1]) and not np.allclose(a[1], a[2])
    # Member 2 follows its own stream, whatever else the batch holds.
    alone = backend.to_numpy(langevin(fg, x0[:1], s, xp, members=[2]).x)
    np.testing.assert_allclose(alone[0], a[2], rtol=1e-12, atol=1e-12)
    other = backend.to_numpy(langevin(fg, x0, LangevinSettings(
        steps=50, t_start=1.0, t_end=0.2, mobility=1e-2, seed=8), xp).x)
    assert not np.allclose(other, a)


def test_constant_temperature_samples_the_boltzmann_distribution(backend):
    """T = k x²: at kT the variance of x is kT / 2k (equipartition); mu k = 0.01 keeps the
    discretisation's bias to about 1 %."""
    xp = backend.xp
    k, kt, mu = 1.0, 0.5, 1e-2
    fg = _quadratic(xp, k, 0.0)
    s = LangevinSettings(steps=300, t_start=kt, t_end=kt, mobility=mu, max_step=10.0, seed=3)
    x = xp.asarray(np.zeros((2, 2000)))
    x = langevin(fg, x, s, xp).x                      # burn-in: 6 relaxation times
    samples = []
    for seed in range(4):
        s.seed, s.steps = 100 + seed, 100
        x = langevin(fg, x, s, xp).x
        samples.append(float((backend.to_numpy(x) ** 2).mean()))
    assert np.mean(samples) == pytest.approx(kt / (2 * k), rel=0.1)


def test_cooling_ends_at_the_minimum(backend, rng):
    xp = backend.xp
    centre = rng.normal(size=(1, 12))
    fg = _quadratic(xp, 2.0, xp.asarray(centre))
    x0 = xp.asarray(rng.normal(size=(4, 12)) * 3.0)
    s = LangevinSettings(steps=2000, t_start=1.0, t_end=0.0, mobility=2e-2, max_step=0.5)
    x = backend.to_numpy(langevin(fg, x0, s, xp).x)
    # The last ~12 steps (a relaxation time) are at kT <= 0.006: x within sd 0.04 of it.
    assert np.sqrt(((x - centre) ** 2).mean()) < 0.1


def test_settings_are_checked():
    fg = _quadratic(np, 1.0, 0.0)
    for bad in (dict(steps=0), dict(t_start=-1.0), dict(mobility=0.0), dict(t_end=np.nan)):
        with pytest.raises(ParameterError):
            langevin(fg, np.zeros((1, 3)), LangevinSettings(**bad))
