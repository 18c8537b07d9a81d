"""Batched L-BFGS: every model converges on its own, bounds hold, finished models stay put."""
import numpy as np

from gpu_refine.minimize import LBFGSSettings, minimize_lbfgs


def rosenbrock(xp, shift):
    def fg(x):
        a, b = x[:, :-1], x[:, 1:]
        f = ((1 - a) ** 2 + 100 * (b - a ** 2) ** 2).sum(axis=1) + shift * 0
        g = xp.zeros_like(x)
        g[:, :-1] += -2 * (1 - a) - 400 * a * (b - a ** 2)
        g[:, 1:] += 200 * (b - a ** 2)
        return f, g
    return fg


def test_batched_rosenbrock_each_model_converges(backend, rng):
    xp = backend.xp
    x0 = backend.asarray(rng.uniform(-2, 2, (6, 2)))
    x0[0] = 1.0      # starts at the minimum: must not move and take no iterations
    res = minimize_lbfgs(rosenbrock(xp, 0.0), x0, LBFGSSettings(max_iterations=500, gtol=1e-8,
                                                               ftol=0), xp=xp)
    x = backend.to_numpy(res.x)
    assert res.converged.all()
    np.testing.assert_allclose(x, 1.0, atol=1e-4)
    assert res.iterations[0] == 0 and (res.iterations[1:] > 10).all()
    assert len(set(res.iterations[1:].tolist())) > 1   # models stop on their own


def test_bounds_are_respected(backend, rng):
    xp = backend.xp
    target = backend.asarray(rng.uniform(-3, 3, (4, 5)))

    def fg(x):
        return ((x - target) ** 2).sum(axis=1), 2 * (x - target)

    # Tight stopping rules: the test is about the bounds, not about when to stop (the default
    # gtol is relative to |f|, which the held components keep large).
    settings = LBFGSSettings(max_iterations=200, gtol=1e-10, ftol=0.0)
    res = minimize_lbfgs(fg, xp.zeros((4, 5)), settings, lower=0.0, upper=1.0, xp=xp)
    np.testing.assert_allclose(backend.to_numpy(res.x),
                               np.clip(backend.to_numpy(target), 0, 1), atol=1e-6)
