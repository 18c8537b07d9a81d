// Triangular solves with one banded lower-triangular matrix L for many right-hand sides: the
// change of variables that preconditions the sites (gpu_refine/restraints/precondition.py).
//
// NumPy twin: cpu_fallback/banded.py  banded_solve (same arguments, same results).
// Loader: gpu_refine/cuda.py; gpu_refine/kernel_source.py prepends "#define REAL float|double"
// (nothing else is generated) and gives the options.
//
// band (k+1, n) double, LAPACK's lower band storage: band[d * n + j] = L[j + d, j].
// rhs, out (n, ncol) REAL, row-major: column c is one right-hand side (a coordinate of one
// model), so the threads of a warp read consecutive addresses of a row.
//   transpose = 0:  L y = rhs    y_i = (rhs_i - sum_{d=1..k} L[i, i-d] y_{i-d}) / L[i, i]
//   transpose = 1:  L^T y = rhs  y_i = (rhs_i - sum_{d=1..k} L[i+d, i] y_{i+d}) / L[i, i]
// Launch: one thread per column, ceil(ncol / blockDim.x) blocks; each thread walks the n rows
// in order, accumulating in double.  out must not alias rhs.

#ifndef REAL
#define REAL float
#endif

typedef REAL real_t;

extern "C" __global__ void banded_solve_kernel(const double* __restrict__ band, int n, int k,
                                               const real_t* __restrict__ rhs, int ncol,
                                               int transpose, real_t* __restrict__ out) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= ncol) return;
  const long long stride = ncol;
  for (int step = 0; step < n; ++step) {
    const int i = transpose ? n - 1 - step : step;
    double s = (double)rhs[i * stride + c];
    if (transpose) {
      const int last = min(k, n - 1 - i);
      for (int d = 1; d <= last; ++d)
        s -= band[(long long)d * n + i] * (double)out[(i + d) * stride + c];
    } else {
      const int last = min(k, i);
      for (int d = 1; d <= last; ++d)
        s -= band[(long long)d * n + (i - d)] * (double)out[(i - d) * stride + c];
    }
    out[i * stride + c] = (real_t)(s / band[i]);
  }
}
