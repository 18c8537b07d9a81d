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


def lbfgs_update(gram, rho, gamma, cols, head, active, pending, f, f_new, gmax, gtol, ftol,
                 failures, slow, iterations):
    """After a step: the new pair's dot products ``cols`` (B, 2m, 2) into gram (in place),
    rho and gamma (in place) where the pair has curvature; the history dropped where the line
    search failed; the counters and ``active`` (in place) for the stopping rules."""
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
    active &= (failures < 2) & (slow < 2) & (gmax > gtol * np.maximum(1.0, np.abs(f_new)))
