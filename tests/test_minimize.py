"""Batched L-BFGS: every model converges on its own, bounds hold, finished models stay put."""
import numpy as np
import pytest

import cpu_fallback
from gpu_refine.minimize import LBFGSSettings, _History, _State, minimize_lbfgs


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
                                                               ftol=0), backend=backend)
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
    res = minimize_lbfgs(fg, xp.zeros((4, 5)), settings, lower=0.0, upper=1.0, backend=backend)
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
    with rejected pairs (no curvature) and one model's history dropped by a failed line
    search (it keeps its curvature scale)."""
    n_models, n_par, m = 3, 12, 4
    xp = backend.xp
    hist = _History(backend, n_models, n_par, m)
    kept = [[] for _ in range(n_models)]
    gamma = np.zeros(n_models)
    settings = LBFGSSettings(gtol=0.0, ftol=-1.0)
    for step in range(7):
        a = rng.normal(size=(n_models, n_par, n_par))
        s = rng.normal(size=(n_models, n_par))
        y = np.einsum("bij,bkj,bk->bi", a, a, s) + 0.1 * s      # s . y > 0
        keep = np.array([True, step % 3 != 1, True])
        y[~keep] = -y[~keep]                                     # s . y < 0: rejected
        failed = np.array([False, False, step == 6])
        state = _State(f=xp.ones(n_models), active=xp.ones(n_models, dtype=bool),
                       pending=xp.asarray(failed), failures=xp.zeros(n_models, np.int64),
                       slow=xp.zeros(n_models, np.int64),
                       iterations=xp.zeros(n_models, np.int64))
        zero = backend.asarray(np.zeros_like(s))
        hist.update(backend.asarray(s), zero, backend.asarray(y), zero, state,
                    xp.zeros(n_models), xp.empty(n_models), settings)
        for b in range(n_models):
            good = keep[b] and not failed[b]
            kept[b] = (kept[b] + [(s[b], y[b]) if good else None])[-m:]
            gamma[b] = (s[b] @ y[b]) / (y[b] @ y[b]) if good else gamma[b]
            if failed[b]:
                kept[b] = [None] * m
        assert backend.to_numpy(state.active).all()
        assert backend.to_numpy(state.iterations).tolist() == (1 - failed).tolist()
    g = rng.normal(size=(n_models, n_par))
    gmax = np.abs(g).max(axis=1)
    d, dg = hist.direction(backend.asarray(g), backend.asarray(gmax),
                           xp.ones(n_models, dtype=bool))
    d = backend.to_numpy(d)
    for b in range(n_models):
        want = _two_loop([p for p in kept[b] if p is not None], g[b], gamma[b])
        np.testing.assert_allclose(d[b], -want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(dg), (d * g).sum(axis=1), rtol=1e-9)
    assert len([p for p in kept[1] if p is not None]) < m      # some entry was empty
    np.testing.assert_allclose(d[2], -gamma[2] * g[2])        # model 3 forgot its pairs


def _history_inputs(rng, n_models=5, m=4):
    """Random dot products of m pairs, as the L-BFGS kernels take them."""
    vec = rng.normal(size=(n_models, 2 * m + 1, 9))
    vec[:, m:2 * m] += vec[:, :m]                 # y near s: positive curvature
    gram = np.einsum("bip,bjp->bij", vec[:, :2 * m], vec[:, :2 * m])
    gv = np.einsum("bip,bp->bi", vec, vec[:, 2 * m])
    rho = 1.0 / np.einsum("bip,bip->bi", vec[:, :m], vec[:, m:2 * m])
    rho[1, 2] = 0.0                               # an empty slot
    gamma = rng.uniform(0.5, 2.0, n_models)
    gamma[3] = 0.0                                # no history yet: 1 / max|g|
    active = np.ones(n_models, dtype=bool)
    active[4] = False
    return gram, gv, rho, gamma, rng.uniform(0.5, 2.0, n_models), active


def test_lbfgs_kernels_parity(gpu, rng):
    """ops.lbfgs_direction and lbfgs_update on the device against their NumPy twins (fresh
    random dot products, poisoned outputs; models active, inactive, failed, moved)."""
    m, n = 4, 5
    gram, gv, rho, gamma, gmax, active = _history_inputs(rng, n, m)
    gv[0] = -gv[0]                                # flips model 1's d.g: a restart
    ref = cpu_fallback.lbfgs_direction(gram, gv, rho.copy(), gamma, gmax, active, 3, True,
                                       np.full((n, 2 * m + 1), np.nan), np.full(n, np.nan))
    rho_dev = gpu.asarray(rho)
    got = gpu.ops.lbfgs_direction(gpu.asarray(gram), gpu.asarray(gv), rho_dev,
                                  gpu.asarray(gamma), gpu.asarray(gmax), gpu.asarray(active), 3,
                                  True, gpu.xp.full((n, 2 * m + 1), np.nan),
                                  gpu.xp.full(n, np.nan))
    for r, g in zip(ref, got):
        np.testing.assert_allclose(gpu.to_numpy(g), r, rtol=1e-12, atol=1e-14)
    rho_ref = rho.copy()
    cpu_fallback.lbfgs_direction(gram, gv, rho_ref, gamma, gmax, active, 3, True,
                                 np.empty((n, 2 * m + 1)), np.empty(n))
    np.testing.assert_array_equal(gpu.to_numpy(rho_dev), rho_ref)

    cols = rng.normal(size=(n, 2 * m, 2))
    cols[:, 1, 1] = np.abs(cols[:, 1, 1])         # slot 1: s.y > 0 for most
    cols[2, 1, 1] = -1.0                          # model 3: no curvature
    pending = np.array([False, True, False, False, False])   # model 2: line search failed
    f = rng.uniform(1, 2, n)
    f_new = f * rng.uniform(0.5, 0.9, n)          # decreases well ...
    f_new[0] = f[0] * (1 - 1e-9)                  # ... but model 1's: slow a second time
    counters = [np.array([0, 1, 0, 1, 0]), np.array([1, 0, 0, 1, 0]), np.arange(n)]
    g_new = rng.normal(size=(n, 37))
    arrays = ([gram.copy(), rho.copy(), gamma.copy(), active.copy()]
              + [c.copy() for c in counters] + [np.full(n, np.nan)])
    dev = [gpu.asarray(a) for a in arrays]
    cpu_fallback.lbfgs_update(arrays[0], arrays[1], arrays[2], cols, 1, arrays[3], pending, f,
                              f_new, g_new, 1e-12, 1e-5, *arrays[4:])
    gpu.ops.lbfgs_update(dev[0], dev[1], dev[2], gpu.asarray(cols), 1, dev[3],
                         gpu.asarray(pending), gpu.asarray(f), gpu.asarray(f_new),
                         gpu.asarray(g_new), 1e-12, 1e-5, *dev[4:])
    for r, g in zip(arrays, dev):
        np.testing.assert_allclose(gpu.to_numpy(g), r, rtol=1e-14)
    assert arrays[3].tolist() == [False, False, True, True, False]
    np.testing.assert_array_equal(arrays[-1], np.abs(g_new).max(axis=1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lbfgs_step_kernels_parity(gpu, rng, dtype):
    """ops.lbfgs_step, lbfgs_trial (with and without bounds), lbfgs_accept and lbfgs_pair on
    the device against their NumPy twins (fresh random inputs, poisoned outputs)."""
    n, p = 5, 13
    active = np.array([True, True, False, True, True])
    direction = rng.normal(size=(n, 77)) * rng.uniform(0.01, 3.0, (n, 1))
    ref_step = cpu_fallback.lbfgs_step(direction, active, 0.5, np.full(n, np.nan))
    got = gpu.ops.lbfgs_step(gpu.asarray(direction), gpu.asarray(active), 0.5,
                             gpu.xp.full(n, np.nan))
    np.testing.assert_array_equal(gpu.to_numpy(got), ref_step)
    assert ref_step[2] == 0 and ((ref_step > 0) == active).all()

    x = rng.uniform(0, 1, (n, p)).astype(dtype)
    x_last = rng.uniform(0, 1, (n, p)).astype(dtype)
    d = rng.normal(size=(n, p))
    pending = np.array([True, False, True, True, False])
    for lower, upper in ((None, None), (0.2, 0.9), (rng.uniform(0, 0.3, p), 1.0)):
        ref = cpu_fallback.lbfgs_trial(x, d, ref_step, pending, x_last, lower, upper,
                                       np.full((n, p), np.nan, dtype))
        dev_bound = (lambda v: gpu.asarray(v) if isinstance(v, np.ndarray) else v)
        got = gpu.ops.lbfgs_trial(gpu.asarray(x), gpu.asarray(d), gpu.asarray(ref_step),
                                  gpu.asarray(pending), gpu.asarray(x_last), dev_bound(lower),
                                  dev_bound(upper), gpu.xp.full((n, p), np.nan, dtype))
        np.testing.assert_array_equal(gpu.to_numpy(got), ref)

    f = rng.uniform(1, 2, n)
    f_t = f + rng.normal(scale=0.1, size=n)
    f_t[3] = np.nan
    args = (f_t, rng.normal(size=(n, p)).astype(dtype), x, f, ref_step, -rng.uniform(0, 1, n),
            pending, 1e-4, rng.uniform(1, 2, n), rng.normal(size=(n, p)).astype(dtype), x_last)
    shapes = [((n,), np.float64), ((n, p), dtype), ((n, p), dtype), ((n,), bool), ((n,), bool)]
    ref = [np.zeros(sh, dt) for sh, dt in shapes]
    cpu_fallback.lbfgs_accept(*args, *ref)
    got = [gpu.xp.zeros(sh, dt) for sh, dt in shapes]
    gpu.ops.lbfgs_accept(*[gpu.asarray(a) if isinstance(a, np.ndarray) else a for a in args],
                         *got)
    for r, g in zip(ref, got):
        np.testing.assert_array_equal(gpu.to_numpy(g), r)
    assert not ref[3][3] and ref[4][3]       # a non-finite f is never accepted

    m = 3
    vectors = rng.normal(size=(n, 2 * m + 1, p))
    pair = (x, x_last, rng.normal(size=(n, p)).astype(dtype), x)
    ref = cpu_fallback.lbfgs_pair(*pair, vectors.copy(), 2)
    got = gpu.ops.lbfgs_pair(*[gpu.asarray(a) for a in pair], gpu.asarray(vectors), 2)
    np.testing.assert_array_equal(gpu.to_numpy(got), ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lbfgs_bound_kernels_parity(gpu, rng, dtype):
    """ops.lbfgs_project_gradient, lbfgs_bound_direction and lbfgs_slope on the device
    against their NumPy twins: parameters on either bound, held, moving out or in; a model
    whose direction turns uphill once masked (a restart); an inactive model."""
    n, p, m = 4, 70, 3
    lower, upper = rng.uniform(0, 0.2, p).astype(dtype).astype(np.float64), 1.0
    x = rng.uniform(0.2, 0.9, (n, p)).astype(dtype)
    x[:, :10] = lower[:10].astype(dtype)
    x[:, 10:20] = upper
    g = rng.normal(size=(n, p)).astype(dtype)
    g[:, 5] = 0
    ref = cpu_fallback.lbfgs_project_gradient(x, g, lower, upper, np.full_like(g, np.nan))
    got = gpu.ops.lbfgs_project_gradient(gpu.asarray(x), gpu.asarray(g), gpu.asarray(lower),
                                         upper, gpu.xp.full(g.shape, np.nan, dtype))
    np.testing.assert_array_equal(gpu.to_numpy(got), ref)
    assert (ref[:, :10][g[:, :10] > 0] == 0).all() and (ref[:, 10:20][g[:, 10:20] < 0] == 0).all()

    d = -g.astype(np.float64) * rng.uniform(0.5, 2, (n, p))
    d[1] = g[1]                                 # model 2 goes uphill: steepest descent
    active = np.array([True, True, True, False])
    gamma, gmax = np.array([0.5, 0.0, 2.0, 1.0]), np.abs(g).max(axis=1)
    rho = rng.uniform(0.1, 1, (n, m))
    out = [d.copy(), rho.copy(), np.full(n, np.nan)]
    cpu_fallback.lbfgs_bound_direction(out[0], x, g, lower, upper, active, gamma, gmax,
                                       out[1], out[2])
    dev = [gpu.asarray(a) for a in (d, rho, np.full(n, np.nan))]
    gpu.ops.lbfgs_bound_direction(dev[0], gpu.asarray(x), gpu.asarray(g), gpu.asarray(lower),
                                  upper, gpu.asarray(active), gpu.asarray(gamma),
                                  gpu.asarray(gmax), dev[1], dev[2])
    for r, a in zip(out, dev):
        np.testing.assert_allclose(gpu.to_numpy(a), r, rtol=1e-12, atol=1e-14)
    assert (out[1][1] == 0).all() and (out[1][0] != 0).all()     # only model 2 restarted
    assert (out[2][:3] < 0).all() and out[2][3] == 0 and (out[0][3] == 0).all()

    trial = rng.uniform(0, 1, (n, p)).astype(dtype)
    ref = cpu_fallback.lbfgs_slope(trial, x, g, np.full(n, np.nan))
    got = gpu.ops.lbfgs_slope(gpu.asarray(trial), gpu.asarray(x), gpu.asarray(g),
                              gpu.xp.full(n, np.nan))
    np.testing.assert_allclose(gpu.to_numpy(got), ref, rtol=1e-12)
