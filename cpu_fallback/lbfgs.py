"""NumPy twins of kernels/lbfgs.cu: the per-model bookkeeping of the batched L-BFGS
(gpu_refine/minimize.py), written over all models at once.  Arguments and formulas are those
of the .cu file's header; arrays marked "in place" are updated where they are."""
import numpy as np


def lbfgs_direction(gram, gv, rho, gamma, gmax, active, head, check_descent, coef, dg):
    """coef (B, 2m+1) and dg (B,) written: the direction d = coef . [s; y; g] = -H g of the
    two-loop recursion on the dot products, and d . g.  With ``check_descent``, a model whose
    d . g >= 0 drops its history (rho, in place) and takes d = -scale g."""
    m = rho.shape[1]
    scale = np.where(gamma > 0, gamma, 1.0 / np.maximum(gmax, 1e-300))
    sy = gram[:, :m, m:]                      # sy[:, i, j] = s_i . y_j
    yy = gram[:, m:, m:]
    a = np.zeros(rho.shape)
    c = np.zeros(rho.shape)
    sq = gv[:, :m].copy()                     # s_i . q for the current q
    newest_first = [(head - 1 - k) % m for k in range(m)]
    for i in newest_first:
        a[:, i] = rho[:, i] * sq[:, i]
        sq -= a[:, i, None] * sy[:, :, i]
    yr = scale[:, None] * (gv[:, m:2 * m] - np.einsum("bj,bij->bi", a, yy))
    for i in reversed(newest_first):
        c[:, i] = a[:, i] - rho[:, i] * yr[:, i]
        yr += c[:, i, None] * sy[:, i, :]
    coef[:, :m] = -c
    coef[:, m:2 * m] = scale[:, None] * a
    coef[:, 2 * m] = -scale
    dg[:] = (coef * gv).sum(axis=1)
    if check_descent:
        bad = ~(dg < 0)
        coef[bad, :2 * m] = 0.0
        rho[bad] = 0.0
        dg[:] = np.where(bad, -scale * gv[:, 2 * m], dg)
    coef[~active] = 0.0
    dg[~active] = 0.0
    return coef, dg


def lbfgs_update(gram, rho, gamma, cols, head, active, pending, f, f_new, g_new, gtol, ftol,
                 failures, slow, iterations, gmax):
    """After a step: the new pair's dot products ``cols`` (B, 2m, 2) into gram (in place),
    rho and gamma (in place) where the pair has curvature; the history dropped where the line
    search failed; max|g_new| of each model into ``gmax``; the counters and ``active`` (in
    place) for the stopping rules."""
    m = rho.shape[1]
    h = head
    for j, slot in enumerate((h, m + h)):
        gram[:, :, slot] = cols[:, :, j]
        gram[:, slot, :] = cols[:, :, j]
    sy, yy = cols[:, h, 1], cols[:, m + h, 1]
    moved = active & ~pending
    good = moved & (sy > 1e-12 * np.maximum(1.0, yy))
    rho[:, h] = np.where(good, 1.0 / np.where(good, sy, 1.0), 0.0)
    gamma[:] = np.where(good, sy / np.maximum(yy, 1e-300), gamma)
    failed = active & pending
    rho[failed] = 0.0
    failures[:] = np.where(failed, failures + 1, 0)
    rel = (f - f_new) / np.maximum(np.abs(f), 1e-300)
    slow[:] = np.where(moved & (rel < ftol), slow + 1, np.where(moved, 0, slow))
    iterations += moved
    gmax[:] = np.abs(g_new).max(axis=1)
    active &= (failures < 2) & (slow < 2) & (gmax > gtol * np.maximum(1.0, np.abs(f_new)))


def lbfgs_step(d, active, max_step, out):
    """Step length of each model (B,) along d (B, P): 1, or less where d's largest component
    would move a parameter by more than ``max_step``; 0 for inactive models."""
    dmax = np.abs(d).max(axis=1)
    out[:] = np.where(active, np.minimum(1.0, max_step / np.maximum(dmax, 1e-300)), 0.0)
    return out


def lbfgs_trial(x, d, step, pending, x_last, lower, upper, out):
    """Trial parameters (B, P) in x's dtype: x + step d, clipped to [lower, upper] (arrays
    of 1 or P values, or None), where ``pending``; the last accepted ``x_last`` elsewhere."""
    move = (step[:, None] * d.astype(x.dtype)).astype(x.dtype)
    trial = x + move
    if lower is not None or upper is not None:
        trial = np.clip(trial, lower, upper)
    out[...] = np.where(pending[:, None], trial, x_last)
    return out


def lbfgs_accept(f_t, g_t, trial, f, step, slope, pending, armijo, f_last, g_last, x_last,
                 f_out, g_out, x_out, ok_out, pending_out):
    """The Armijo test of each pending model's trial: finite, f_t <= f + armijo min(step
    slope, 0) and f_t <= f (step slope: the first-order decrease).  Writes ok, the models
    still pending, and the last accepted f, g, x (the trial's where ok, the given last ones
    elsewhere)."""
    decrease = step * slope
    ok = pending & np.isfinite(f_t) & (f_t <= f + armijo * np.minimum(decrease, 0.0)) \
        & (f_t <= f)
    ok_out[:] = ok
    pending_out[:] = pending & ~ok
    f_out[:] = np.where(ok, f_t, f_last)
    g_out[...] = np.where(ok[:, None], g_t, g_last)
    x_out[...] = np.where(ok[:, None], trial, x_last)
    return ok_out


def lbfgs_pair(x_new, x, g_new, g, vectors, head):
    """The step's pair into the history block (B, 2m+1, P) float64: slot ``head`` gets
    s = x_new - x, slot m + head gets y = g_new - g (differences in float64), the last row
    the new gradient g_new."""
    m = (vectors.shape[1] - 1) // 2
    vectors[:, head] = x_new.astype(np.float64) - x.astype(np.float64)
    vectors[:, m + head] = g_new.astype(np.float64) - g.astype(np.float64)
    vectors[:, 2 * m] = g_new
    return vectors


def _bound_values(v, n_par):
    """A bound as (P,) float64 (None: none)."""
    return None if v is None else np.broadcast_to(np.asarray(v, np.float64), (n_par,))


def _outward(x, v, lower, upper):
    """Components of v (B, P) that point out through the bound x sits on."""
    out = np.zeros(x.shape, dtype=bool)
    if lower is not None:
        out |= (x <= lower) & (v < 0)
    if upper is not None:
        out |= (x >= upper) & (v > 0)
    return out


def lbfgs_project_gradient(x, g, lower, upper, out):
    """g (B, P) with the components held at a bound zeroed: where x sits on a bound and the
    descent direction -g points out through it."""
    n_par = x.shape[1]
    lo, hi = _bound_values(lower, n_par), _bound_values(upper, n_par)
    out[...] = np.where(_outward(x, -g, lo, hi), 0, g)
    return out


def lbfgs_bound_direction(d, x, g, lower, upper, active, gamma, gmax, rho, dg):
    """The direction d (B, P) float64 kept inside the bounds, in place: zero for held
    parameters (on a bound, gradient zero) and for moves out through a bound; dg (B,) = d . g.
    A model whose d is then no descent direction takes d = -scale g (scale = gamma, or
    1 / max|g| without history) and drops its history (rho, in place).  Inactive: d = 0."""
    n_par = x.shape[1]
    lo, hi = _bound_values(lower, n_par), _bound_values(upper, n_par)
    on_bound = np.zeros(x.shape, dtype=bool)
    if lo is not None:
        on_bound |= x <= lo
    if hi is not None:
        on_bound |= x >= hi
    d[(g == 0) & on_bound | _outward(x, d, lo, hi)] = 0.0
    g64 = g.astype(np.float64)
    dg[:] = (d * g64).sum(axis=1)
    bad = ~(dg < 0) & active
    scale = np.where(gamma > 0, gamma, 1.0 / np.maximum(gmax.astype(np.float64), 1e-300))
    d[bad] = -scale[bad, None] * g64[bad]
    rho[bad] = 0.0
    dg[bad] = (d[bad] * g64[bad]).sum(axis=1)
    d[~active] = 0.0
    dg[~active] = 0.0
    return d, dg


def lbfgs_slope(trial, x, g, out):
    """(trial - x) . g of each model (B,), in float64: a bounded step's first-order decrease."""
    out[:] = ((trial.astype(np.float64) - x.astype(np.float64)) * g.astype(np.float64)).sum(
        axis=1)
    return out
