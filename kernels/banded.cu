// Triangular solves with one banded lower-triangular matrix L for many right-hand sides: the
// change of variables that preconditions the sites (gpu_refine/restraints/precondition.py).
//
// NumPy twin: cpu_fallback/banded.py  banded_solve (same arguments, same results).
// Loader: gpu_refine/cuda.py; gpu_refine/kernel_source.py prepends "#define REAL float|double"
// (nothing else is generated) and gives the options.
//
// band (k+1, n) double, LAPACK's lower band storage: band[d * n + j] = L[j + d, j].
// rhs, out (B, n, w) REAL: B * w right-hand sides (for the sites: w = 3, one column per
// coordinate of each model), row i of the factor at row rhs_rows[i] of rhs where
// map_rhs (else row i) and at out_rows[i] of out where map_out: the factor's atom order, so
// that the solve reads and writes the sites' own layout and order.
//   transpose = 0:  L y = rhs    y_i = (rhs_i - sum_{d=1..k} L[i, i-d] y_{i-d}) / L[i, i]
//   transpose = 1:  L^T y = rhs  y_i = (rhs_i - sum_{d=1..k} L[i+d, i] y_{i+d}) / L[i, i]
// Launch: one thread per column (B * w), ceil(B * w / blockDim.x) blocks; each thread walks the
// n rows in order, accumulating in double.  out must not alias rhs.

#ifndef REAL
#define REAL float
#endif

typedef REAL real_t;

extern "C" __global__ void banded_solve_kernel(const double* __restrict__ band, int n, int k,
                                               const real_t* __restrict__ rhs,
                                               const int* __restrict__ rhs_rows, int map_rhs,
                                               int n_models, int width, int transpose,
                                               const int* __restrict__ out_rows, int map_out,
                                               real_t* __restrict__ out) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= n_models * width) return;
  const long long base = (long long)(c / width) * n * width + c % width;
  const real_t* in = rhs + base;
  real_t* y = out + base;
#define ROW_IN(i) ((long long)(map_rhs ? rhs_rows[i] : (i)) * width)
#define ROW_OUT(i) ((long long)(map_out ? out_rows[i] : (i)) * width)
  for (int step = 0; step < n; ++step) {
    const int i = transpose ? n - 1 - step : step;
    double s = (double)in[ROW_IN(i)];
    if (transpose) {
      const int last = min(k, n - 1 - i);
      for (int d = 1; d <= last; ++d) s -= band[(long long)d * n + i] * (double)y[ROW_OUT(i + d)];
    } else {
      const int last = min(k, i);
      for (int d = 1; d <= last; ++d)
        s -= band[(long long)d * n + (i - d)] * (double)y[ROW_OUT(i - d)];
    }
    y[ROW_OUT(i)] = (real_t)(s / band[i]);
  }
#undef ROW_IN
#undef ROW_OUT
}
