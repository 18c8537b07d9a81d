"""Batched L-BFGS: B independent minimisations over (B, P) parameters, written once with ``xp``.

Every model has its own history, step length, convergence flag and iteration count; the
objective is evaluated for the whole batch at once (that is what makes batching pay), and
models that have converged keep their parameters while the others go on.  Bounds are kept by
projection onto [lower, upper] (used for B > 0 and occupancies in [0, 1]).
"""
from dataclasses import dataclass

import numpy as np

from .backend import to_host


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


class _History:
    """The last m (s, y) pairs of every model and their dot products.

    The two-loop recursion needs only dot products of the pairs with each other and with g:
    those are kept on the host, the recursion runs on (B, m) numbers there, and a direction
    costs two batched matrix products on the device (not 4 m vector operations, each a
    launch on a GPU).  An entry with rho = 0 is empty."""

    def __init__(self, xp, n_models, n_par, m):
        self.xp = xp
        self.m = m
        # s_0 … s_{m-1}, y_0 … y_{m-1} of each model, and their dot products
        self.vectors = xp.zeros((n_models, 2 * m, n_par), dtype=xp.float64)
        self.gram = np.zeros((n_models, 2 * m, 2 * m))
        self.rho = np.zeros((n_models, m))      # 1 / (s_i . y_i)
        self.gamma = np.zeros(n_models)         # s.y / y.y of the newest pair; 0: none yet
        self.head = 0                           # the slot of the next pair

    def add(self, sk, yk, keep):
        """Store (sk, yk) (B, P) where ``keep`` (host bool, B), an empty entry elsewhere."""
        xp, h, m = self.xp, self.head, self.m
        k = xp.asarray(keep)[:, None]
        self.vectors[:, h] = xp.where(k, sk, 0.0)
        self.vectors[:, m + h] = xp.where(k, yk, 0.0)
        pair = self.vectors[:, h::m]                                    # s_h, y_h
        cols = to_host(xp.matmul(self.vectors, pair.transpose(0, 2, 1)))  # (B, 2m, 2)
        for j, slot in enumerate((h, m + h)):
            self.gram[:, :, slot] = cols[:, :, j]
            self.gram[:, slot, :] = cols[:, :, j]
        sy, yy = self.gram[:, h, m + h], self.gram[:, m + h, m + h]
        self.rho[:, h] = np.where(keep, 1.0 / np.where(keep, sy, 1.0), 0.0)
        self.gamma = np.where(keep, sy / np.maximum(yy, 1e-300), self.gamma)
        self.head = (h + 1) % m

    def forget(self, models):
        """Drop the whole history of ``models`` (host bool, B)."""
        self.rho[models] = 0.0

    def direction(self, g, scale):
        """H g (B, P) float64 for the inverse Hessian H of the stored pairs with H0 = scale
        (host, B): the two-loop recursion, q <- q - a_i y_i newest first, then
        r <- r + (a_i - b_i) s_i oldest first, on the dot products; r is then
        scale g + sum c_i s_i + e_i y_i."""
        xp, m = self.xp, self.m
        gv = to_host(xp.matmul(self.vectors, g.astype(xp.float64, copy=False)[:, :, None]))[..., 0]
        sy = self.gram[:, :m, m:]                         # sy[:, i, j] = s_i . y_j
        yy = self.gram[:, m:, m:]
        a = np.zeros_like(self.rho)
        c = np.zeros_like(self.rho)
        sq = gv[:, :m].copy()                             # s_i . q for the current q
        newest_first = [(self.head - 1 - k) % m for k in range(m)]
        for i in newest_first:
            a[:, i] = self.rho[:, i] * sq[:, i]
            sq -= a[:, i, None] * sy[:, :, i]
        yr = scale[:, None] * (gv[:, m:] - np.einsum("bj,bij->bi", a, yy))   # y_i . r
        for i in reversed(newest_first):
            c[:, i] = a[:, i] - self.rho[:, i] * yr[:, i]
            yr += c[:, i, None] * sy[:, i, :]
        coef = xp.asarray(np.concatenate([c, -scale[:, None] * a], axis=1))
        return (xp.asarray(scale)[:, None] * g
                + xp.matmul(coef[:, None, :], self.vectors)[:, 0, :])


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
    history = _History(xp, n_models, n_par, max(1, s.history))
    f, g = fg(x)
    n_eval = 1
    active = xp.ones(n_models, dtype=bool)
    iterations = xp.zeros(n_models, dtype=xp.int64)
    slow = xp.zeros(n_models, dtype=xp.int64)
    failures = xp.zeros(n_models, dtype=xp.int64)
    for _ in range(s.max_iterations):
        gmax = xp.abs(g).max(axis=1)
        active &= gmax > s.gtol * xp.maximum(1.0, xp.abs(f))
        if not bool(active.any()):
            break
        gamma = history.gamma
        scale = np.where(gamma > 0, gamma, 1.0 / np.maximum(to_host(gmax), 1e-300))
        d = (-history.direction(g, scale)).astype(x.dtype)
        if bounded:
            # Held parameters (on a bound, gradient zeroed) stay put, and moves out through a
            # bound would be clipped away yet set the step length (max_step) for the others:
            # both are left out of the direction.
            held = (g == 0) & _on_bound(xp, x, lower, upper)
            d = xp.where(held | _on_bound(xp, x, lower, upper, d), 0, d)
        dg = _rowdot(xp, d, g)
        bad = dg >= 0
        if bool(bad.any()):   # not a descent direction: steepest descent, history dropped
            d = xp.where(bad[:, None], -g * xp.asarray(scale)[:, None], d)
            history.forget(to_host(bad))
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
        # A failed line search drops the history but keeps the curvature scale gamma, so the
        # steepest-descent restart takes a step of the right length near a minimum; two
        # failures in a row stop that model.
        failed = active & pending
        keep, lost = to_host(xp.stack([good, failed]))
        history.add(sk, yk, keep)
        history.forget(lost)
        failures = xp.where(failed, failures + 1, 0)
        rel = (f - f_new) / xp.maximum(xp.abs(f), 1e-300)
        slow = xp.where(moved & (rel < s.ftol), slow + 1, xp.where(moved, 0, slow))
        iterations += moved.astype(iterations.dtype)
        x, f, g = x_new, f_new, g_new
        active &= (failures < 2) & (slow < 2)
    return LBFGSResult(x=x, f=f, iterations=to_host(iterations), converged=to_host(~active),
                       n_evaluations=n_eval)
