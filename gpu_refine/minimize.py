"""Batched L-BFGS: B independent minimisations over (B, P) parameters, written once with ``xp``.

Every model has its own history, step length, convergence flag and iteration count; the
objective is evaluated for the whole batch at once (that is what makes batching pay), and
models that have converged keep their parameters while the others go on.  Bounds are kept by
projection onto [lower, upper] (used for B > 0 and occupancies in [0, 1]).
"""
from dataclasses import dataclass

import numpy as np


@dataclass
class LBFGSSettings:
    max_iterations: int = 100
    history: int = 10
    gtol: float = 1e-5         # converged when max |g| <= gtol * max(1, |f|)
    ftol: float = 1e-7         # ... or the relative decrease of f stays below ftol twice
    max_step: float = 0.5      # largest change of any parameter in one step
    max_backtracks: int = 12
    armijo: float = 1e-4


@dataclass
class LBFGSResult:
    x: object              # (B,P)
    f: object              # (B,) float64
    iterations: np.ndarray  # (B,) int
    converged: np.ndarray   # (B,) bool
    n_evaluations: int


def _on_bound(xp, x, lower, upper, d=None):
    """Components on a bound; with ``d``, only those that ``d`` would move outwards."""
    out = xp.zeros(x.shape, dtype=bool)
    if lower is not None:
        out |= (x <= lower) if d is None else (x <= lower) & (d < 0)
    if upper is not None:
        out |= (x >= upper) if d is None else (x >= upper) & (d > 0)
    return out


def _rowdot(xp, a, b):
    """Row-wise dot products in float64 (one batched matrix product: on a GPU each array
    operation is a launch, and the minimiser's own work is mostly launches)."""
    a = a.astype(xp.float64, copy=False)
    b = b.astype(xp.float64, copy=False)
    return xp.matmul(a[:, None, :], b[:, :, None])[:, 0, 0]


def minimize_lbfgs(fg, x0, settings=None, lower=None, upper=None, xp=np):
    """Minimise f(x) for each row of x0 (B,P); ``fg(x) -> (f (B,), g (B,P))``.

    With bounds, parameters on a bound whose gradient points outwards are held there (their
    gradient is taken as zero), the others move freely and are projected back after a step.
    """
    s = settings or LBFGSSettings()
    x = xp.array(x0, copy=True)
    bounded = lower is not None or upper is not None
    if bounded:
        x = xp.clip(x, lower, upper)
        raw_fg = fg

        def fg(x):
            f, g = raw_fg(x)
            return f, xp.where(_on_bound(xp, x, lower, upper, -g), 0, g)
    n_models, n_par = x.shape
    m = max(1, s.history)
    # float64 history: the two-loop recursion works on it without conversions.
    S = xp.zeros((m, n_models, n_par), dtype=xp.float64)
    Y = xp.zeros_like(S)
    rho = xp.zeros((m, n_models), dtype=xp.float64)
    gamma = xp.zeros(n_models, dtype=xp.float64)
    f, g = fg(x)
    n_eval = 1
    active = xp.ones(n_models, dtype=bool)
    iterations = xp.zeros(n_models, dtype=xp.int64)
    slow = xp.zeros(n_models, dtype=xp.int64)
    failures = xp.zeros(n_models, dtype=xp.int64)
    head = 0
    for _ in range(s.max_iterations):
        gmax = xp.abs(g).max(axis=1)
        active &= gmax > s.gtol * xp.maximum(1.0, xp.abs(f))
        if not bool(active.any()):
            break
        # Two-loop recursion, all models at once (entries with rho = 0 are empty).
        q = g.astype(xp.float64)
        alphas = []
        for k in range(m):
            i = (head - 1 - k) % m
            a = rho[i] * _rowdot(xp, S[i], q)
            q -= a[:, None] * Y[i]
            alphas.append((i, a))
        scale = xp.where(gamma > 0, gamma, 1.0 / xp.maximum(gmax, 1e-300))
        r = q * scale[:, None]
        for i, a in reversed(alphas):
            b = rho[i] * _rowdot(xp, Y[i], r)
            r += (a - b)[:, None] * S[i]
        d = (-r).astype(x.dtype)
        if bounded:
            # Held parameters (on a bound, gradient zeroed) stay put, and moves out through a
            # bound would be clipped away yet set the step length (max_step) for the others:
            # both are left out of the direction.
            held = (g == 0) & _on_bound(xp, x, lower, upper)
            d = xp.where(held | _on_bound(xp, x, lower, upper, d), 0, d)
        dg = _rowdot(xp, d, g)
        bad = dg >= 0
        if bool(bad.any()):   # not a descent direction: steepest descent, history dropped
            d = xp.where(bad[:, None], -g * scale[:, None], d)
            rho[:, bad] = 0
            dg = _rowdot(xp, d, g)
        dmax = xp.abs(d).max(axis=1)
        step = xp.minimum(1.0, s.max_step / xp.maximum(dmax, 1e-300))
        step = xp.where(active, step, 0.0)
        pending = active.copy()
        x_new, f_new, g_new = x, f, g
        for _ls in range(s.max_backtracks):
            trial = x + (step[:, None] * d).astype(x.dtype)
            if bounded:
                trial = xp.clip(trial, lower, upper)
            trial = xp.where(pending[:, None], trial, x_new)
            f_t, g_t = fg(trial)
            n_eval += 1
            decrease = _rowdot(xp, trial - x, g)
            ok = pending & xp.isfinite(f_t) & (f_t <= f + s.armijo * xp.minimum(decrease, 0.0)) \
                & (f_t <= f)
            x_new = xp.where(ok[:, None], trial, x_new)
            f_new = xp.where(ok, f_t, f_new)
            g_new = xp.where(ok[:, None], g_t, g_new)
            pending &= ~ok
            if not bool(pending.any()):
                break
            step = xp.where(pending, step * 0.5, step)
        moved = active & ~pending
        sk = x_new.astype(xp.float64) - x
        yk = g_new.astype(xp.float64) - g
        sy = _rowdot(xp, sk, yk)
        good = moved & (sy > 1e-12 * xp.maximum(1.0, _rowdot(xp, yk, yk)))
        S[head] = xp.where(good[:, None], sk, 0)
        Y[head] = xp.where(good[:, None], yk, 0)
        rho[head] = xp.where(good, 1.0 / xp.where(good, sy, 1.0), 0.0)
        gamma = xp.where(good, sy / xp.maximum(_rowdot(xp, yk, yk), 1e-300), gamma)
        head = (head + 1) % m
        # A failed line search drops the history but keeps the curvature scale gamma, so the
        # steepest-descent restart takes a step of the right length near a minimum; two
        # failures in a row stop that model.
        failed = active & pending
        rho[:, failed] = 0
        failures = xp.where(failed, failures + 1, 0)
        rel = (f - f_new) / xp.maximum(xp.abs(f), 1e-300)
        slow = xp.where(moved & (rel < s.ftol), slow + 1, xp.where(moved, 0, slow))
        iterations += moved.astype(iterations.dtype)
        x, f, g = x_new, f_new, g_new
        active &= (failures < 2) & (slow < 2)
    converged = ~active
    to_np = (lambda a: a.get()) if hasattr(x, "get") else np.asarray
    return LBFGSResult(x=x, f=f, iterations=to_np(iterations), converged=to_np(converged),
                       n_evaluations=n_eval)
