"""Batched L-BFGS: B independent minimisations over (B, P) parameters, written once with ``xp``.

Every model has its own history, step length, convergence flag and iteration count; the
objective is evaluated for the whole batch at once (that is what makes batching pay), and
models that have converged keep their parameters while the others go on.  Bounds are kept by
projection onto [lower, upper] (used for B > 0 and occupancies in [0, 1]).  The per-model
decisions are the kernel set's ``lbfgs_*`` functions (kernels/lbfgs.cu, cpu_fallback/lbfgs.py),
so that on a GPU they stay on the device.
"""
from dataclasses import dataclass

import numpy as np

from .backend import get_backend, to_host


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


class _History:
    """The last m (s, y) pairs of every model, their dot products and the current gradient.

    The two-loop recursion needs only dot products of the pairs with each other and with g:
    ``vectors`` (B, 2m+1, P) holds s_0 … s_{m-1}, y_0 … y_{m-1} and g, so a direction costs
    two batched matrix products (the dot products with g, and the combination), and the
    recursion itself runs in one thread per model (ops.lbfgs_direction), on the device: no
    transfer to the host, and not 4 m vector operations, each a launch on a GPU."""

    def __init__(self, backend, n_models, n_par, m):
        self.backend = backend
        xp = self.xp = backend.xp
        self.m = m
        self.vectors = xp.zeros((n_models, 2 * m + 1, n_par), dtype=xp.float64)
        self.gram = xp.zeros((n_models, 2 * m, 2 * m), dtype=xp.float64)
        self.rho = xp.zeros((n_models, m), dtype=xp.float64)   # 1 / (s_i . y_i); 0: empty
        self.gamma = xp.zeros(n_models, dtype=xp.float64)      # s.y / y.y of the newest pair
        self.head = 0                                           # the slot of the next pair
        self._coef = xp.empty((n_models, 2 * m + 1), dtype=xp.float64)
        self._dg = xp.empty(n_models, dtype=xp.float64)

    def direction(self, g, gmax, active, check_descent=True):
        """(d = -H g (B, P) float64, d . g (B,)) for the inverse Hessian H of the stored
        pairs with H0 = gamma (1 / max|g| without history); zero for inactive models.  With
        ``check_descent``, a model whose d is no descent direction drops its history and
        takes d = -H0 g.  g: None where it is the one the last update() stored."""
        xp, m = self.xp, self.m
        if g is not None:   # the first direction's; update() puts the later ones there
            self.vectors[:, 2 * m] = g
        gv = xp.matmul(self.vectors, self.vectors[:, 2 * m, :, None])[..., 0]
        coef, dg = self.backend.ops.lbfgs_direction(self.gram, gv, self.rho, self.gamma, gmax,
                                                    active, self.head, check_descent,
                                                    self._coef, self._dg)
        return xp.matmul(coef[:, None, :], self.vectors)[:, 0, :], dg

    def update(self, x_new, x, g_new, g, state, f_new, gmax, settings):
        """Store the step's pair (x_new - x, g_new - g) (B, P) in the next slot and g_new as
        the current gradient; update the dot products, curvature scale, max|g_new| (into
        ``gmax``) and the stopping counters of ``state`` (ops.lbfgs_pair, lbfgs_update)."""
        xp, m, h = self.xp, self.m, self.head
        self.backend.ops.lbfgs_pair(x_new, x, g_new, g, self.vectors, h)
        pair = self.vectors[:, h:2 * m:m]                               # s_h, y_h
        cols = xp.matmul(self.vectors[:, :2 * m], pair.transpose(0, 2, 1))   # (B, 2m, 2)
        self.backend.ops.lbfgs_update(self.gram, self.rho, self.gamma, cols, h, state.active,
                                      state.pending, state.f, f_new, g_new, settings.gtol,
                                      settings.ftol, state.failures, state.slow,
                                      state.iterations, gmax)
        self.head = (h + 1) % m


@dataclass
class _State:
    """Per-model bookkeeping on the device."""
    f: object
    active: object
    pending: object
    failures: object
    slow: object
    iterations: object


def minimize_lbfgs(fg, x0, settings=None, lower=None, upper=None, backend=None,
                   recheck=None):
    """Minimise f(x) for each row of x0 (B,P); ``fg(x) -> (f (B,), g (B,P))``.

    With bounds, parameters on a bound whose gradient points outwards are held there (their
    gradient is taken as zero), the others move freely and are projected back after a step.
    The decisions stay on the device: two device→host transfers per iteration (whether a
    trial step left any model pending, whether any model is still active), one more per
    backtrack.  ``recheck`` (optional): ``stale()`` is a device flag (or None) after each
    evaluation, nonzero where fg's own caches were out of date for it (a restraint pair
    list); it travels with the minimiser's transfer, and such an evaluation is made again
    after ``refresh()``.
    """
    s = settings or LBFGSSettings()
    bk = get_backend(backend)
    xp = bk.xp
    x = xp.array(x0, copy=True)
    bounded = lower is not None or upper is not None
    if bounded:
        x = xp.clip(x, lower, upper)
        raw_fg = fg

        def fg(x):
            f, g = raw_fg(x)
            return f, bk.ops.lbfgs_project_gradient(x, g, lower, upper, xp.empty_like(g))
    n_models, n_par = x.shape
    history = _History(bk, n_models, n_par, max(1, s.history))
    n_eval = 0

    def evaluate(p, pending_of=None):
        """(f, g, what pending_of(f, g) gives, any of its pending): fg at p, repeated while
        ``recheck`` finds it stale, with one device→host transfer for both answers."""
        nonlocal n_eval
        while True:
            f_p, g_p = fg(p)
            n_eval += 1
            out = pending_of(f_p, g_p) if pending_of else None
            flags = [out[-1].any()] if pending_of else []
            stale = recheck.stale() if recheck is not None else None
            if stale is not None:
                flags.append(stale)
            host = to_host(xp.stack(flags)) if flags else ()
            if stale is None or not host[-1]:
                return f_p, g_p, out, bool(host[0]) if pending_of else None
            recheck.refresh()

    f, g, _, _ = evaluate(x)
    gmax = xp.abs(g).max(axis=1)
    zeros = xp.zeros(n_models, dtype=xp.int64)
    state = _State(f=f, active=gmax > s.gtol * xp.maximum(1.0, xp.abs(f)),
                   pending=xp.zeros(n_models, dtype=bool), failures=zeros,
                   slow=zeros.copy(), iterations=zeros.copy())
    ops = bk.ops
    ones = xp.ones(n_models)
    first = True
    for _ in range(s.max_iterations):
        if not bool(state.active.any()):
            break
        d, dg = history.direction(g if first else None, gmax, state.active,
                                  check_descent=not bounded)
        first = False
        if bounded:
            # Held parameters (on a bound, gradient zeroed) stay put, and moves out through a
            # bound would be clipped away yet set the step length (max_step) for the others:
            # both are left out of the direction (then checked for descent).
            ops.lbfgs_bound_direction(d, x, g, lower, upper, state.active, history.gamma,
                                      gmax, history.rho, dg)
        step = ops.lbfgs_step(d, state.active, s.max_step, xp.empty(n_models, xp.float64))
        state.pending = state.active
        x_new, f_new, g_new = x, f, g
        for _ls in range(s.max_backtracks):
            trial = ops.lbfgs_trial(x, d, step, state.pending, x_new, lower, upper,
                                    xp.empty_like(x))
            # Without bounds the trial is x + step d, and its first-order decrease step d.g;
            # with bounds, (trial - x).g.
            slope, scale = ((ops.lbfgs_slope(trial, x, g, xp.empty(n_models)), ones)
                            if bounded else (dg, step))

            def accepted(f_t, g_t):
                out = (xp.empty_like(f_new), xp.empty_like(g_new), xp.empty_like(x_new),
                       xp.empty(n_models, bool), xp.empty(n_models, bool))
                ops.lbfgs_accept(f_t, g_t, trial, f, scale, slope, state.pending, s.armijo,
                                 f_new, g_new, x_new, *out)
                return out
            _, _, (f_new, g_new, x_new, _, pending), any_pending = evaluate(trial, accepted)
            state.pending = pending
            if not any_pending:
                break
            step = xp.where(pending, step * 0.5, step)
        gmax = xp.empty_like(gmax)
        history.update(x_new, x, g_new, g, state, f_new, gmax, s)
        x, f, g = x_new, f_new, g_new
        state.f = f
    return LBFGSResult(x=x, f=f, iterations=to_host(state.iterations),
                       converged=to_host(~state.active), n_evaluations=n_eval)
