// The per-model bookkeeping of the batched L-BFGS (gpu_refine/minimize.py): the two-loop
// recursion on the dot products of the stored pairs, and the update after a step.  One thread
// per model (one warp per model where a kernel also reduces over the P parameters); the other
// (B, P) work is one thread per parameter, or batched matrix products on the Python side.
//
// NumPy twins: cpu_fallback/lbfgs.py  lbfgs_direction, lbfgs_update, lbfgs_step, lbfgs_trial,
// lbfgs_accept, lbfgs_pair, lbfgs_project_gradient, lbfgs_bound_direction, lbfgs_slope (same
// arguments).
// Loader: gpu_refine/cuda.py; gpu_refine/kernel_source.py prepends "#define REAL float|double"
// (nothing else is generated): REAL is the parameters' precision; the history, the dot
// products and the per-model numbers are double.
//
// History of m pairs per model: slot i holds s_i and y_i; gram (B, 2m, 2m) double holds the
// dot products of [s_0..s_{m-1}, y_0..y_{m-1}]; rho (B, m) = 1 / (s_i . y_i), 0 for an empty
// slot; gamma (B,) = s.y / y.y of the newest kept pair (0: none); head = the next slot.
//
// lbfgs_direction: gv (B, 2m+1) = [s_i . g, y_i . g, g . g].  H0 = scale I with scale = gamma,
// or 1 / max|g| without history.  The two-loop recursion, newest slot first:
//   a_i = rho_i (s_i . q),  q <- q - a_i y_i;   r = scale q;   oldest first:
//   c_i = a_i - rho_i (y_i . r),  r <- r + c_i s_i
// run on dot products alone gives H g = scale g + sum c_i s_i - scale a_i y_i; the kernel writes
// coef (B, 2m+1) of d = -H g in [s; y; g] and dg = d . g.  check_descent: where dg >= 0 (or not a
// number) the model drops its history and d = -scale g.  Inactive models get d = 0.
//
// lbfgs_update: cols (B, 2m, 2) = [v_j . s_h, v_j . y_h] after the new pair went to slot h.
// Writes row and column h and m+h of gram; a moved model (active, not pending) whose pair has
// s.y > 1e-12 max(1, y.y) keeps it (rho_h, gamma), else rho_h = 0; a failed line search (active
// and pending) drops the history.  failures, slow (relative decrease below ftol) and iterations
// count on; gmax = max|g_new|; active stays where failures < 2, slow < 2 and
// gmax > gtol max(1, |f_new|).

#ifndef REAL
#define REAL float
#endif

typedef REAL real_t;

#define MAX_HISTORY 32
#define WARP_SIZE 32
#define FULL_MASK 0xffffffffu

// Largest |v[p]| of a row of n values, over the 32 lanes of the warp that calls it (lane 0
// gets the whole row's).
template <typename T>
__device__ inline double warp_abs_max(const T* v, long long n) {
  double m = 0.0;
  for (long long p = threadIdx.x; p < n; p += WARP_SIZE) m = fmax(m, fabs((double)v[p]));
  for (int off = WARP_SIZE / 2; off > 0; off >>= 1)
    m = fmax(m, __shfl_down_sync(FULL_MASK, m, off));
  return m;
}

extern "C" __global__ void lbfgs_direction_kernel(
    const double* __restrict__ gram, const double* __restrict__ gv, double* __restrict__ rho,
    const double* __restrict__ gamma, const real_t* __restrict__ gmax,
    const bool* __restrict__ active, int head, int m, int check_descent, int n_models,
    double* __restrict__ coef, double* __restrict__ dg) {
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= n_models) return;
  const int n = 2 * m;
  const double* G = gram + (long long)b * n * n;
  const double* v = gv + (long long)b * (n + 1);
  double* r_b = rho + (long long)b * m;
  double* out = coef + (long long)b * (n + 1);
  if (!active[b]) {
    for (int j = 0; j <= n; ++j) out[j] = 0.0;
    dg[b] = 0.0;
    return;
  }
  const double scale = gamma[b] > 0.0 ? gamma[b] : 1.0 / fmax((double)gmax[b], 1e-300);
  double a[MAX_HISTORY], c[MAX_HISTORY], sq[MAX_HISTORY], yr[MAX_HISTORY];
  for (int i = 0; i < m; ++i) sq[i] = v[i];
  for (int k = 0; k < m; ++k) {  // newest first
    const int i = ((head - 1 - k) % m + m) % m;
    a[i] = r_b[i] * sq[i];
    for (int j = 0; j < m; ++j) sq[j] -= a[i] * G[j * n + m + i];  // s_j . y_i
  }
  for (int i = 0; i < m; ++i) {
    double t = v[m + i];
    for (int j = 0; j < m; ++j) t -= a[j] * G[(m + i) * n + m + j];  // y_i . y_j
    yr[i] = scale * t;
  }
  for (int k = m - 1; k >= 0; --k) {  // oldest first
    const int i = ((head - 1 - k) % m + m) % m;
    c[i] = a[i] - r_b[i] * yr[i];
    for (int j = 0; j < m; ++j) yr[j] += c[i] * G[i * n + m + j];  // s_i . y_j
  }
  double d_g = 0.0;
  for (int i = 0; i < m; ++i) {
    out[i] = -c[i];
    out[m + i] = scale * a[i];
    d_g += out[i] * v[i] + out[m + i] * v[m + i];
  }
  out[n] = -scale;
  d_g += out[n] * v[n];
  if (check_descent && !(d_g < 0.0)) {
    for (int j = 0; j < n; ++j) out[j] = 0.0;
    for (int i = 0; i < m; ++i) r_b[i] = 0.0;
    d_g = -scale * v[n];
  }
  dg[b] = d_g;
}

// One warp per model (grid B, block 32).
extern "C" __global__ void lbfgs_update_kernel(
    double* __restrict__ gram, double* __restrict__ rho, double* __restrict__ gamma,
    const double* __restrict__ cols, int head, int m, bool* __restrict__ active,
    const bool* __restrict__ pending, const double* __restrict__ f,
    const double* __restrict__ f_new, const real_t* __restrict__ g_new, long long n_par,
    double gtol, double ftol, long long* __restrict__ failures, long long* __restrict__ slow,
    long long* __restrict__ iterations, real_t* __restrict__ gmax) {
  const long long b = blockIdx.x;
  const double gm = warp_abs_max(g_new + b * n_par, n_par);
  if (threadIdx.x != 0) return;
  const int n = 2 * m, h = head;
  double* G = gram + b * n * n;
  const double* col = cols + b * n * 2;
  // Slot h's column and row, then slot m+h's: where the two products s_h . y_h differ in
  // rounding, the second one stays, as in the NumPy twin.
  for (int j = 0; j < n; ++j) G[j * n + h] = G[h * n + j] = col[2 * j];
  for (int j = 0; j < n; ++j) G[j * n + m + h] = G[(m + h) * n + j] = col[2 * j + 1];
  const double sy = col[2 * h + 1], yy = col[2 * (m + h) + 1];
  const bool act = active[b], moved = act && !pending[b], failed = act && pending[b];
  const bool good = moved && sy > 1e-12 * fmax(1.0, yy);
  double* r_b = rho + b * m;
  r_b[h] = good ? 1.0 / sy : 0.0;
  if (good) gamma[b] = sy / fmax(yy, 1e-300);
  if (failed)
    for (int i = 0; i < m; ++i) r_b[i] = 0.0;
  failures[b] = failed ? failures[b] + 1 : 0;
  const double rel = (f[b] - f_new[b]) / fmax(fabs(f[b]), 1e-300);
  if (moved) slow[b] = rel < ftol ? slow[b] + 1 : 0;
  iterations[b] += moved ? 1 : 0;
  gmax[b] = (real_t)gm;
  active[b] = act && failures[b] < 2 && slow[b] < 2 &&
              (double)(real_t)gm > gtol * fmax(1.0, fabs(f_new[b]));
}

// Step length per model along d (B, P), one warp per model (grid B, block 32):
// min(1, max_step / max|d|), 0 for inactive models.
extern "C" __global__ void lbfgs_step_kernel(const double* __restrict__ d, long long n_par,
                                             const bool* __restrict__ active, double max_step,
                                             double* __restrict__ out) {
  const long long b = blockIdx.x;
  const double dmax = warp_abs_max(d + b * n_par, n_par);
  if (threadIdx.x == 0) out[b] = active[b] ? fmin(1.0, max_step / fmax(dmax, 1e-300)) : 0.0;
}

// Bounds of parameter p: n_lower / n_upper values (0: none, 1: one for all, else one each).
__device__ inline real_t clip_to(real_t v, const double* lower, int n_lower,
                                 const double* upper, int n_upper, long long p) {
  if (n_lower) v = fmax(v, (real_t)lower[n_lower == 1 ? 0 : p]);
  if (n_upper) v = fmin(v, (real_t)upper[n_upper == 1 ? 0 : p]);
  return v;
}

// (B, P): the trial x + step d (in REAL, as x + (REAL)(step (REAL)d)), clipped, where pending;
// the last accepted parameters elsewhere.
extern "C" __global__ void lbfgs_trial_kernel(
    const real_t* __restrict__ x, const double* __restrict__ d, const double* __restrict__ step,
    const bool* __restrict__ pending, const real_t* __restrict__ x_last,
    const double* __restrict__ lower, int n_lower, const double* __restrict__ upper,
    int n_upper, long long n_par, long long n, real_t* __restrict__ out) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const long long b = i / n_par, p = i % n_par;
  if (!pending[b]) {
    out[i] = x_last[i];
    return;
  }
  const real_t move = (real_t)(step[b] * (double)(real_t)d[i]);
  out[i] = clip_to(x[i] + move, lower, n_lower, upper, n_upper, p);
}

// (B, P): the Armijo test of each model (recomputed by every thread of its row, written by
// the row's first), and the last accepted x and g.
extern "C" __global__ void lbfgs_accept_kernel(
    const double* __restrict__ f_t, const real_t* __restrict__ g_t,
    const real_t* __restrict__ trial, const double* __restrict__ f,
    const double* __restrict__ step, const double* __restrict__ slope,
    const bool* __restrict__ pending, double armijo,
    const double* __restrict__ f_last, const real_t* __restrict__ g_last,
    const real_t* __restrict__ x_last, long long n_par, long long n,
    double* __restrict__ f_out, real_t* __restrict__ g_out, real_t* __restrict__ x_out,
    bool* __restrict__ ok_out, bool* __restrict__ pending_out) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const long long b = i / n_par, p = i % n_par;
  const double ft = f_t[b];
  const double decrease = step[b] * slope[b];
  const bool ok = pending[b] && isfinite(ft) && ft <= f[b] + armijo * fmin(decrease, 0.0) &&
                  ft <= f[b];
  g_out[i] = ok ? g_t[i] : g_last[i];
  x_out[i] = ok ? trial[i] : x_last[i];
  if (p == 0) {
    ok_out[b] = ok;
    pending_out[b] = pending[b] && !ok;
    f_out[b] = ok ? ft : f_last[b];
  }
}

// (B, P): the step's pair into the history block (B, 2m+1, P): s = x_new - x to slot head,
// y = g_new - g to slot m + head, in double; g_new to the last row.
extern "C" __global__ void lbfgs_pair_kernel(const real_t* __restrict__ x_new,
                                             const real_t* __restrict__ x,
                                             const real_t* __restrict__ g_new,
                                             const real_t* __restrict__ g, int head, int m,
                                             long long n_par, long long n,
                                             double* __restrict__ vectors) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const long long b = i / n_par, p = i % n_par;
  double* row = vectors + b * (2 * m + 1) * n_par;
  row[head * n_par + p] = (double)x_new[i] - (double)x[i];
  row[(m + head) * n_par + p] = (double)g_new[i] - (double)g[i];
  row[2 * m * n_par + p] = (double)g_new[i];
}

// Bounds are given as n_lower / n_upper values (0: none, 1: one for all, else one each).
__device__ inline bool outward(double x, double v, const double* lower, int n_lower,
                               const double* upper, int n_upper, long long p) {
  return (n_lower && x <= lower[n_lower == 1 ? 0 : p] && v < 0) ||
         (n_upper && x >= upper[n_upper == 1 ? 0 : p] && v > 0);
}

// (B, P): g with the components held at a bound zeroed (x on a bound, -g pointing out).
extern "C" __global__ void lbfgs_project_gradient_kernel(
    const real_t* __restrict__ x, const real_t* __restrict__ g, const double* __restrict__ lower,
    int n_lower, const double* __restrict__ upper, int n_upper, long long n_par, long long n,
    real_t* __restrict__ out) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const long long p = i % n_par;
  const real_t gi = g[i];
  out[i] = outward((double)x[i], -(double)gi, lower, n_lower, upper, n_upper, p) ? (real_t)0
                                                                                  : gi;
}

// One warp per model (grid B, block 32): d (B, P) kept inside the bounds in place, dg = d.g;
// no descent: d = -scale g and the history dropped; inactive: d = 0.
extern "C" __global__ void lbfgs_bound_direction_kernel(
    double* __restrict__ d, const real_t* __restrict__ x, const real_t* __restrict__ g,
    const double* __restrict__ lower, int n_lower, const double* __restrict__ upper,
    int n_upper, const bool* __restrict__ active, const double* __restrict__ gamma,
    const real_t* __restrict__ gmax, double* __restrict__ rho, int m, long long n_par,
    double* __restrict__ dg) {
  const long long b = blockIdx.x;
  double* db = d + b * n_par;
  const real_t* xb = x + b * n_par;
  const real_t* gb = g + b * n_par;
  if (!active[b]) {
    for (long long p = threadIdx.x; p < n_par; p += WARP_SIZE) db[p] = 0.0;
    if (threadIdx.x == 0) dg[b] = 0.0;
    return;
  }
  double s = 0.0;
  for (long long p = threadIdx.x; p < n_par; p += WARP_SIZE) {
    const double xp = xb[p], gp = gb[p];
    const bool on_bound = (n_lower && xp <= lower[n_lower == 1 ? 0 : p]) ||
                          (n_upper && xp >= upper[n_upper == 1 ? 0 : p]);
    if ((gp == 0.0 && on_bound) || outward(xp, db[p], lower, n_lower, upper, n_upper, p))
      db[p] = 0.0;
    s += db[p] * gp;
  }
  for (int off = WARP_SIZE / 2; off > 0; off >>= 1) s += __shfl_down_sync(FULL_MASK, s, off);
  s = __shfl_sync(FULL_MASK, s, 0);
  if (s < 0.0) {
    if (threadIdx.x == 0) dg[b] = s;
    return;
  }
  const double scale = gamma[b] > 0.0 ? gamma[b] : 1.0 / fmax((double)gmax[b], 1e-300);
  double t = 0.0;
  for (long long p = threadIdx.x; p < n_par; p += WARP_SIZE) {
    db[p] = -scale * (double)gb[p];
    t += db[p] * (double)gb[p];
  }
  for (int off = WARP_SIZE / 2; off > 0; off >>= 1) t += __shfl_down_sync(FULL_MASK, t, off);
  if (threadIdx.x == 0) {
    dg[b] = t;
    for (int i = 0; i < m; ++i) rho[b * m + i] = 0.0;
  }
}

// One warp per model: (trial - x) . g in double.
extern "C" __global__ void lbfgs_slope_kernel(const real_t* __restrict__ trial,
                                              const real_t* __restrict__ x,
                                              const real_t* __restrict__ g, long long n_par,
                                              double* __restrict__ out) {
  const long long b = blockIdx.x;
  double s = 0.0;
  for (long long p = threadIdx.x; p < n_par; p += WARP_SIZE) {
    const long long i = b * n_par + p;
    s += ((double)trial[i] - (double)x[i]) * (double)g[i];
  }
  for (int off = WARP_SIZE / 2; off > 0; off >>= 1) s += __shfl_down_sync(FULL_MASK, s, off);
  if (threadIdx.x == 0) out[b] = s;
}
