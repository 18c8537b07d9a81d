// Map values and their Cartesian gradients at atom positions, for a batch of models.
//
// NumPy twin: cpu_fallback/interpolate.py  interpolate_at_atoms.
// Loader: gpu_refine/cuda.py; gpu_refine/kernel_source.py prepends "#define REAL float|double"
// (nothing else is generated) and gives the options.
//
// order 1: trilinear; order 3: Catmull-Rom tricubic (the cubic convolution gemmi's
// Grid.tricubic_interpolation uses).  Model m reads map map_index[m], so one map can serve many
// models (ensembles) or each model can have its own.  `periodic` is a bit mask: bit a set where
// grid axis a wraps around; along any other axis indices clamp to the box edge (atoms outside a
// box are rejected on the host).

#ifndef REAL
#define REAL float
#endif

typedef REAL real_t;

__device__ inline int grid_index(int i, int n, int periodic) {
  if (periodic) return ((i % n) + n) % n;
  return i < 0 ? 0 : (i >= n ? n - 1 : i);
}

__device__ inline void cubic_weights(double u, double w[4], double dw[4]) {
  double u2 = u * u, u3 = u2 * u;
  w[0] = -0.5 * u3 + u2 - 0.5 * u;
  w[1] = 1.5 * u3 - 2.5 * u2 + 1.0;
  w[2] = -1.5 * u3 + 2.0 * u2 + 0.5 * u;
  w[3] = 0.5 * u3 - 0.5 * u2;
  dw[0] = -1.5 * u2 + 2.0 * u - 0.5;
  dw[1] = 4.5 * u2 - 5.0 * u;
  dw[2] = -4.5 * u2 + 4.0 * u + 0.5;
  dw[3] = 1.5 * u2 - u;
}

__device__ inline void linear_weights(double u, double w[4], double dw[4]) {
  w[0] = 0.0; w[1] = 1.0 - u; w[2] = u; w[3] = 0.0;
  dw[0] = 0.0; dw[1] = -1.0; dw[2] = 1.0; dw[3] = 0.0;
}

extern "C" __global__ void interpolate_at_atoms_kernel(
    const real_t* __restrict__ maps, const int* __restrict__ map_index,
    const real_t* __restrict__ xyz, const double* __restrict__ geom, int periodic, int order,
    long long n_models, long long n_atoms, int n0, int n1, int n2,
    real_t* __restrict__ values, real_t* __restrict__ grad) {
  long long ma = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (ma >= n_models * n_atoms) return;
  long long model = ma / n_atoms;
  const real_t* map = maps + (long long)map_index[model] * n0 * n1 * n2;
  const real_t* x = xyz + 3 * ma;
  double d[3] = {(double)x[0] - geom[18], (double)x[1] - geom[19], (double)x[2] - geom[20]};
  double g[3];
  int base[3];
  double w[3][4], dw[3][4];
  for (int a = 0; a < 3; ++a) {
    const double* row = geom + 3 * a;
    g[a] = row[0] * d[0] + row[1] * d[1] + row[2] * d[2];
    double fl = floor(g[a]);
    base[a] = (int)fl;
    if (order == 3)
      cubic_weights(g[a] - fl, w[a], dw[a]);
    else
      linear_weights(g[a] - fl, w[a], dw[a]);
  }
  int n[3] = {n0, n1, n2};
  int idx[3][4];
  for (int a = 0; a < 3; ++a)
    for (int t = 0; t < 4; ++t) idx[a][t] = grid_index(base[a] + t - 1, n[a], (periodic >> a) & 1);
  int t0 = order == 3 ? 0 : 1, t1 = order == 3 ? 4 : 3;
  double v = 0, gi = 0, gj = 0, gk = 0;
  for (int a = t0; a < t1; ++a) {
    for (int b = t0; b < t1; ++b) {
      const real_t* line = map + ((long long)idx[0][a] * n1 + idx[1][b]) * n2;
      double sv = 0, sd = 0;
      for (int c = t0; c < t1; ++c) {
        double m = (double)line[idx[2][c]];
        sv += w[2][c] * m;
        sd += dw[2][c] * m;
      }
      v += w[0][a] * w[1][b] * sv;
      gi += dw[0][a] * w[1][b] * sv;
      gj += w[0][a] * dw[1][b] * sv;
      gk += w[0][a] * w[1][b] * sd;
    }
  }
  values[ma] = (real_t)v;
  // d/dx = (d idx / d x)^T d/d idx, with d idx / d x = index_from_xyz.
  for (int c = 0; c < 3; ++c)
    grad[3 * ma + c] = (real_t)(geom[c] * gi + geom[3 + c] * gj + geom[6 + c] * gk);
}
