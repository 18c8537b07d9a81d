"""Batched L-BFGS: every model converges on its own, bounds hold, finished models stay put."""
import numpy as np

from gpu_refine.minimize import LBFGSSettings, _History, minimize_lbfgs


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


def _two_loop(pairs, g, scale):
    """Textbook L-BFGS two-loop recursion (Nocedal & Wright, Algorithm 7.4) for one model:
    ``pairs`` oldest first; returns H g."""
    q = g.copy()
    alphas = []
    for s, y in reversed(pairs):
        a = (s @ q) / (s @ y)
        q -= a * y
        alphas.append(a)
    r = scale * q
    for (s, y), a in zip(pairs, reversed(alphas)):
        b = (y @ r) / (s @ y)
        r += (a - b) * s
    return r


def test_history_direction_is_the_two_loop_recursion(backend, rng):
    """Pairs kept as dot products give the textbook H g: a history wrapped around its ring,
    with empty entries (rejected pairs) and one model's history dropped."""
    n_models, n_par, m = 3, 12, 4
    hist = _History(backend.xp, n_models, n_par, m)
    kept = [[] for _ in range(n_models)]
    for step in range(7):
        a = rng.normal(size=(n_models, n_par, n_par))
        s = rng.normal(size=(n_models, n_par))
        y = np.einsum("bij,bkj,bk->bi", a, a, s) + 0.1 * s      # s . y > 0
        keep = np.array([True, step % 3 != 1, True])
        hist.add(backend.asarray(s), backend.asarray(y), keep)
        for b in range(n_models):
            kept[b] = (kept[b] + [(s[b], y[b]) if keep[b] else None])[-m:]
        if step == 6:
            hist.forget(np.array([False, False, True]))
            kept[2] = [None] * m
    g = rng.normal(size=(n_models, n_par))
    scale = np.array([0.5, 1.5, 2.0])
    got = backend.to_numpy(hist.direction(backend.asarray(g), scale))
    for b in range(n_models):
        want = _two_loop([p for p in kept[b] if p is not None], g[b], scale[b])
        np.testing.assert_allclose(got[b], want, rtol=1e-9, atol=1e-12)
    assert len([p for p in kept[1] if p is not None]) < m      # some entry was empty
    np.testing.assert_allclose(got[2], scale[2] * g[2])       # model 3 forgot its pairs
