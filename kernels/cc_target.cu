// Correlation of model maps with one map inside soft masks, and its gradient map: the CC
// target's passes over the grids (gpu_refine/targets/model_map.py), one read of each model
// map for the statistics and one for the gradient.
//
// NumPy twins: cpu_fallback/cc_target.py  cc_statistics (= cc_sums_kernel + cc_finish_kernel),
// cc_gradient_map (= cc_gradient_map_kernel).
// Loader: gpu_refine/cuda.py; gpu_refine/kernel_source.py prepends "#define REAL float|double"
// (nothing else is generated) and gives the options.
//
// image (B, V) REAL: model maps; masks (S, V) float: weights w >= 0; mask_index (B,) int: the
// mask of each model; y (V,) double: the map; my, w_sum, syy (S,) double: per mask, the map's
// weighted mean, sum w and sum w (y - my)^2.  Per model (sums in double):
//   mx = sum w x / w_sum,  Sxx = sum w x^2 - mx sum w x,  Sxy = sum w x (y - my),
//   CC = Sxy / sqrt(Sxx Syy)
// (sum w (y - my) = 0, so Sxy needs no centring of x).  stats (B, 4) double: CC, mx, Sxx, Sxy;
// value (B,) = scale (1 - CC) for a per-model scale (the target's atoms times its weight).
// Gradient map of scale * CC (scale per model):
//   out = scale * w * ((y - my) / sqrt(Sxx Syy) - CC / Sxx * (x - mx))

#ifndef REAL
#define REAL float
#endif

typedef REAL real_t;

#define WARP_SIZE 32
#define FULL_MASK 0xffffffffu

__device__ inline double warp_sum(double v) {
  for (int off = WARP_SIZE / 2; off > 0; off >>= 1) v += __shfl_down_sync(FULL_MASK, v, off);
  return v;
}

// Grid (blocks per model, B); blockDim a multiple of 32.  Each warp writes its three sums to
// partial[(model * warps per model + warp) * 3 + c]; cc_finish_kernel adds them in order, so
// that a run gives the same CC every time (no atomics).
extern "C" __global__ void cc_sums_kernel(const real_t* __restrict__ image,
                                          const float* __restrict__ masks,
                                          const int* __restrict__ mask_index,
                                          const double* __restrict__ y,
                                          const double* __restrict__ my, long long n_voxels,
                                          double* __restrict__ partial) {
  const long long model = blockIdx.y;
  const int mask = mask_index[model];
  const real_t* x = image + model * n_voxels;
  const float* w = masks + (long long)mask * n_voxels;
  const double m = my[mask];
  const long long stride = (long long)gridDim.x * blockDim.x;
  double sx = 0.0, sxx = 0.0, sxy = 0.0;
  for (long long v = (long long)blockIdx.x * blockDim.x + threadIdx.x; v < n_voxels;
       v += stride) {
    const double wv = w[v];
    if (wv == 0.0) continue;
    const double xv = x[v], wx = wv * xv;
    sx += wx;
    sxx += wx * xv;
    sxy += wx * (y[v] - m);
  }
  sx = warp_sum(sx);
  sxx = warp_sum(sxx);
  sxy = warp_sum(sxy);
  if ((threadIdx.x & (WARP_SIZE - 1)) == 0) {
    const long long warps = (long long)gridDim.x * (blockDim.x / WARP_SIZE);
    const long long slot =
        3 * (model * warps + (long long)blockIdx.x * (blockDim.x / WARP_SIZE) +
             threadIdx.x / WARP_SIZE);
    partial[slot] = sx;
    partial[slot + 1] = sxx;
    partial[slot + 2] = sxy;
  }
}

// One thread per model: the warps' sums added in order, and the statistics.
extern "C" __global__ void cc_finish_kernel(const double* __restrict__ partial, int n_partial,
                                            const int* __restrict__ mask_index,
                                            const double* __restrict__ w_sum,
                                            const double* __restrict__ syy,
                                            const double* __restrict__ scale, int n_models,
                                            double* __restrict__ stats,
                                            double* __restrict__ value) {
  const int model = blockIdx.x * blockDim.x + threadIdx.x;
  if (model >= n_models) return;
  const double* p = partial + 3LL * model * n_partial;
  double sx = 0.0, sxx = 0.0, sxy = 0.0;
  for (int i = 0; i < n_partial; ++i) {
    sx += p[3 * i];
    sxx += p[3 * i + 1];
    sxy += p[3 * i + 2];
  }
  const int mask = mask_index[model];
  const double mx = sx / w_sum[mask];
  const double s = sxx - mx * sx;
  double* out = stats + 4LL * model;
  out[0] = sxy / sqrt(fmax(s, 1e-300) * syy[mask]);
  value[model] = scale[model] * (1.0 - out[0]);
  out[1] = mx;
  out[2] = s;
  out[3] = sxy;
}

// Grid (blocks per model, B): the gradient map of scale * CC for every voxel of every model.
extern "C" __global__ void cc_gradient_map_kernel(
    const real_t* __restrict__ image, const float* __restrict__ masks,
    const int* __restrict__ mask_index, const double* __restrict__ y,
    const double* __restrict__ my, const double* __restrict__ syy,
    const double* __restrict__ stats, const double* __restrict__ scale, long long n_voxels,
    real_t* __restrict__ out) {
  const long long model = blockIdx.y;
  const int mask = mask_index[model];
  const real_t* x = image + model * n_voxels;
  const float* w = masks + (long long)mask * n_voxels;
  real_t* o = out + model * n_voxels;
  const double* st = stats + 4 * model;
  const double sxx = fmax(st[2], 1e-300);
  const double a = scale[model] / sqrt(sxx * syy[mask]), c = scale[model] * st[0] / sxx;
  const double mx = st[1];
  const double m = my[mask];
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long v = (long long)blockIdx.x * blockDim.x + threadIdx.x; v < n_voxels;
       v += stride) {
    const double wv = w[v];
    o[v] = wv == 0.0 ? (real_t)0 : (real_t)(wv * (a * (y[v] - m) - c * ((double)x[v] - mx)));
  }
}
