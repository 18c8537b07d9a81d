// Batched geometry and ADP restraint terms: energy per model, gradient per atom, deltas.
//
// NumPy twins: cpu_fallback/restraints.py  bond_terms, angle_terms, torsion_terms, chiral_terms,
// plane_terms, nonbonded_terms, adp_similarity_terms, moved_beyond (same arguments, same
// results).
// Loader: gpu_refine/cuda.py; gpu_refine/kernel_source.py prepends "#define REAL float|double"
// (nothing else is generated) and gives the options.
//
// Launch: grid (ceil(R / blockDim.x), B), one thread per (restraint, model).  blockIdx.y is the
// model, so each block reduces its energies in double and adds them to energy[model] once per
// warp.  Gradients are added with atomicAdd into grad (B, N, 3); every kernel *adds* to energy
// and grad, so that the caller can sum all restraint types into one gradient.
//
// Terms (w = 1 / sigma^2, delta written to delta[model, restraint] when want_delta):
//   bond       w (d - d0)^2                         delta = d - d0            (Angstrom)
//   angle      w (theta - theta0)^2                 delta = theta - theta0    (radians)
//   torsion    w wrap(phi - phi0, 2 pi / period)^2  delta = wrapped difference (radians)
//   chiral     w (V - V0)^2, V0 = sign * |V0|, or copysign(|V0|, V) for sign 0 ("both")
//   plane      sum_i w_i (n . (x_i - c))^2 over the weighted least-squares plane (n, c);
//              delta per plane atom = its signed distance (n made unique: largest |n_k| > 0)
//   nonbonded  w (dmin - d)^2 if d < dmin else 0    delta = d - dmin
//   adp        w sum_k (v_ik - v_jk)^2 over K values per atom (K = 1: B, K = 6: U)

#ifndef REAL
#define REAL float
#endif

typedef REAL real_t;

struct V3 {
  double x, y, z;
};

__device__ inline V3 v3(double x, double y, double z) {
  V3 r = {x, y, z};
  return r;
}
__device__ inline V3 sub(V3 a, V3 b) { return v3(a.x - b.x, a.y - b.y, a.z - b.z); }
__device__ inline V3 add(V3 a, V3 b) { return v3(a.x + b.x, a.y + b.y, a.z + b.z); }
__device__ inline V3 scale(V3 a, double s) { return v3(a.x * s, a.y * s, a.z * s); }
__device__ inline double dot(V3 a, V3 b) { return a.x * b.x + a.y * b.y + a.z * b.z; }
__device__ inline V3 cross(V3 a, V3 b) {
  return v3(a.y * b.z - a.z * b.y, a.z * b.x - a.x * b.z, a.x * b.y - a.y * b.x);
}
__device__ inline double norm(V3 a) { return sqrt(dot(a, a)); }

__device__ inline V3 load(const real_t* xyz, long long model_base, int atom) {
  const real_t* p = xyz + model_base + 3LL * atom;
  return v3((double)p[0], (double)p[1], (double)p[2]);
}

__device__ inline void add_grad(real_t* grad, long long model_base, int atom, V3 g) {
  real_t* p = grad + model_base + 3LL * atom;
  atomicAdd(p, (real_t)g.x);
  atomicAdd(p + 1, (real_t)g.y);
  atomicAdd(p + 2, (real_t)g.z);
}

// Sum e over the warp and add it once to *energy.
__device__ inline void add_energy(double* energy, double e) {
  for (int off = 16; off > 0; off >>= 1) e += __shfl_down_sync(0xffffffffu, e, off);
  if ((threadIdx.x & 31) == 0 && e != 0.0) atomicAdd(energy, e);
}

// Angle between u and v (radians) and its gradients with respect to u and v.
__device__ inline double angle_and_grad(V3 u, V3 v, V3& du, V3& dv) {
  double lu = norm(u), lv = norm(v);
  V3 c = cross(u, v);
  double s = norm(c), co = dot(u, v);
  double theta = atan2(s, co);
  double sn = fmax(s / (lu * lv), 1e-12);
  double cs = co / (lu * lv);
  V3 uh = scale(u, 1.0 / lu), vh = scale(v, 1.0 / lv);
  du = scale(sub(scale(uh, cs), vh), 1.0 / (lu * sn));
  dv = scale(sub(scale(vh, cs), uh), 1.0 / (lv * sn));
  return theta;
}

#define PREAMBLE                                                           \
  const int r = blockIdx.x * blockDim.x + threadIdx.x;                     \
  const int m = blockIdx.y;                                                \
  const bool active = r < n_restr;                                         \
  const long long base = (long long)m * n_atoms * 3;                       \
  double e = 0.0;

#define EPILOGUE(DELTA)                                                    \
  if (active && want_delta) delta[(long long)m * n_restr + r] = (real_t)(DELTA); \
  add_energy(energy + m, e);

// Distance term shared by bonds (two-sided) and nonbonded pairs (only when closer than target).
__device__ inline double distance_term(const real_t* xyz, real_t* grad, long long base,
                                       const int* atoms, int r, double target, double w,
                                       bool one_sided, double& e) {
  int i = atoms[2 * r], j = atoms[2 * r + 1];
  V3 d = sub(load(xyz, base, i), load(xyz, base, j));
  double len = norm(d);
  double diff = len - target;
  if (!one_sided || diff < 0.0) {
    e = w * diff * diff;
    V3 g = scale(d, 2.0 * w * diff / fmax(len, 1e-12));
    add_grad(grad, base, i, g);
    add_grad(grad, base, j, scale(g, -1.0));
  }
  return diff;
}

extern "C" __global__ void bond_terms_kernel(
    const real_t* xyz, const int* atoms, const real_t* ideal, const real_t* weight,
    int n_atoms, int n_restr, int want_delta, double* energy, real_t* grad, real_t* delta) {
  PREAMBLE
  double diff = 0.0;
  if (active)
    diff = distance_term(xyz, grad, base, atoms, r, (double)ideal[r], (double)weight[r], false, e);
  EPILOGUE(diff)
}

extern "C" __global__ void nonbonded_terms_kernel(
    const real_t* xyz, const int* atoms, const real_t* dmin, const real_t* weight,
    int n_atoms, int n_restr, int want_delta, double* energy, real_t* grad, real_t* delta) {
  PREAMBLE
  double diff = 0.0;
  if (active)
    diff = distance_term(xyz, grad, base, atoms, r, (double)dmin[r], (double)weight[r], true, e);
  EPILOGUE(diff)
}

extern "C" __global__ void angle_terms_kernel(
    const real_t* xyz, const int* atoms, const real_t* ideal, const real_t* weight,
    int n_atoms, int n_restr, int want_delta, double* energy, real_t* grad, real_t* delta) {
  PREAMBLE
  double diff = 0.0;
  if (active) {
    int i = atoms[3 * r], j = atoms[3 * r + 1], k = atoms[3 * r + 2];
    V3 xj = load(xyz, base, j);
    V3 du, dv;
    double theta = angle_and_grad(sub(load(xyz, base, i), xj), sub(load(xyz, base, k), xj),
                                  du, dv);
    diff = theta - (double)ideal[r];
    double w = (double)weight[r];
    e = w * diff * diff;
    double f = 2.0 * w * diff;
    add_grad(grad, base, i, scale(du, f));
    add_grad(grad, base, k, scale(dv, f));
    add_grad(grad, base, j, scale(add(du, dv), -f));
  }
  EPILOGUE(diff)
}

extern "C" __global__ void torsion_terms_kernel(
    const real_t* xyz, const int* atoms, const real_t* ideal, const real_t* weight,
    const int* period, int n_atoms, int n_restr, int want_delta, double* energy, real_t* grad,
    real_t* delta) {
  PREAMBLE
  double diff = 0.0;
  if (active) {
    int a = atoms[4 * r], b = atoms[4 * r + 1], c = atoms[4 * r + 2], d = atoms[4 * r + 3];
    V3 p0 = load(xyz, base, a), p1 = load(xyz, base, b), p2 = load(xyz, base, c),
       p3 = load(xyz, base, d);
    V3 f = sub(p0, p1), g = sub(p1, p2), h = sub(p3, p2);
    V3 ca = cross(f, g), cb = cross(h, g);
    double a2 = fmax(dot(ca, ca), 1e-24), b2 = fmax(dot(cb, cb), 1e-24), lg = norm(g);
    // Same sign convention as gemmi's calculate_dihedral.
    double phi = atan2(dot(cross(cb, ca), g) / lg, dot(ca, cb));
    const double two_pi = 6.283185307179586;
    double per = two_pi / (double)max(1, period[r]);
    diff = phi - (double)ideal[r];
    diff -= per * floor(diff / per + 0.5);
    double w = (double)weight[r];
    e = w * diff * diff;
    double k = 2.0 * w * diff;
    // Gradient of phi (Blondel & Karplus 1996).
    V3 g0 = scale(ca, -lg / a2);
    V3 g3 = scale(cb, lg / b2);
    double fg = dot(f, g) / (lg * lg), hg = dot(h, g) / (lg * lg);
    V3 g1 = sub(scale(g0, -1.0 - fg), scale(g3, hg));
    V3 g2 = add(scale(g3, hg - 1.0), scale(g0, fg));
    add_grad(grad, base, a, scale(g0, k));
    add_grad(grad, base, b, scale(g1, k));
    add_grad(grad, base, c, scale(g2, k));
    add_grad(grad, base, d, scale(g3, k));
  }
  EPILOGUE(diff)
}

extern "C" __global__ void chiral_terms_kernel(
    const real_t* xyz, const int* atoms, const real_t* ideal, const real_t* weight,
    const signed char* sign, int n_atoms, int n_restr, int want_delta, double* energy,
    real_t* grad, real_t* delta) {
  PREAMBLE
  double diff = 0.0;
  if (active) {
    int c = atoms[4 * r], i = atoms[4 * r + 1], j = atoms[4 * r + 2], k = atoms[4 * r + 3];
    V3 pc = load(xyz, base, c);
    V3 a = sub(load(xyz, base, i), pc), b = sub(load(xyz, base, j), pc),
       d = sub(load(xyz, base, k), pc);
    V3 bxd = cross(b, d), dxa = cross(d, a), axb = cross(a, b);
    double vol = dot(a, bxd);
    double target = (double)ideal[r];
    if (sign[r] < 0 || (sign[r] == 0 && vol < 0.0)) target = -target;
    diff = vol - target;
    double w = (double)weight[r];
    e = w * diff * diff;
    double f = 2.0 * w * diff;
    add_grad(grad, base, i, scale(bxd, f));
    add_grad(grad, base, j, scale(dxa, f));
    add_grad(grad, base, k, scale(axb, f));
    add_grad(grad, base, c, scale(add(add(bxd, dxa), axb), -f));
  }
  EPILOGUE(diff)
}

// Unit eigenvector of the smallest eigenvalue of a symmetric 3x3 matrix (a00 a11 a22 a01 a02 a12).
__device__ inline V3 smallest_eigenvector(double a00, double a11, double a22, double a01,
                                          double a02, double a12) {
  double q = (a00 + a11 + a22) / 3.0;
  double b00 = a00 - q, b11 = a11 - q, b22 = a22 - q;
  double p2 = (b00 * b00 + b11 * b11 + b22 * b22 + 2.0 * (a01 * a01 + a02 * a02 + a12 * a12)) / 6.0;
  double p = sqrt(p2);
  double lambda = q;
  if (p > 0.0) {
    double det = b00 * (b11 * b22 - a12 * a12) - a01 * (a01 * b22 - a12 * a02) +
                 a02 * (a01 * a12 - b11 * a02);
    double hr = det / (2.0 * p * p2);
    hr = fmin(1.0, fmax(-1.0, hr));
    // Smallest root of the trigonometric solution.
    lambda = q + 2.0 * p * cos(acos(hr) / 3.0 + 2.0943951023931957);
    // Where the two smaller eigenvalues come close (hr -> 1: nearly collinear atoms) acos
    // loses half the digits of this root, and the normal's error is that over their gap;
    // Newton steps on det(A - lambda I) restore the digits.  A step far beyond that error
    // means the two roots coincide (the normal is ill-defined then).
    for (int it = 0; it < 2; ++it) {
      double c00 = a00 - lambda, c11 = a11 - lambda, c22 = a22 - lambda;
      double m0 = c11 * c22 - a12 * a12, m1 = c00 * c22 - a02 * a02, m2 = c00 * c11 - a01 * a01;
      double f = c00 * m0 - a01 * (a01 * c22 - a12 * a02) + a02 * (a01 * a12 - c11 * a02);
      double df = -(m0 + m1 + m2);
      if (df == 0.0) break;
      double step = f / df;
      if (fabs(step) > 1e-6 * p) break;
      lambda -= step;
    }
  }
  V3 r0 = v3(a00 - lambda, a01, a02), r1 = v3(a01, a11 - lambda, a12),
     r2 = v3(a02, a12, a22 - lambda);
  V3 c0 = cross(r0, r1), c1 = cross(r0, r2), c2 = cross(r1, r2);
  double n0 = dot(c0, c0), n1 = dot(c1, c1), n2 = dot(c2, c2);
  V3 n = c0;
  double nn = n0;
  if (n1 > nn) { n = c1; nn = n1; }
  if (n2 > nn) { n = c2; nn = n2; }
  if (nn <= 0.0) return v3(0.0, 0.0, 1.0);
  n = scale(n, 1.0 / sqrt(nn));
  double ax = fabs(n.x), ay = fabs(n.y), az = fabs(n.z);
  double big = (ax >= ay && ax >= az) ? n.x : ((ay >= az) ? n.y : n.z);
  return big < 0.0 ? scale(n, -1.0) : n;
}

extern "C" __global__ void plane_terms_kernel(
    const real_t* xyz, const int* ptr, const int* atoms, const real_t* weight, int n_atoms,
    int n_restr, int want_delta, double* energy, real_t* grad, real_t* delta) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  const int m = blockIdx.y;
  const long long base = (long long)m * n_atoms * 3;
  const int n_members = ptr[n_restr];
  double e = 0.0;
  if (r < n_restr) {
    int lo = ptr[r], hi = ptr[r + 1];
    double ws = 0.0;
    V3 c = v3(0.0, 0.0, 0.0);
    for (int t = lo; t < hi; ++t) {
      double w = (double)weight[t];
      ws += w;
      c = add(c, scale(load(xyz, base, atoms[t]), w));
    }
    c = scale(c, 1.0 / ws);
    double s00 = 0, s11 = 0, s22 = 0, s01 = 0, s02 = 0, s12 = 0;
    for (int t = lo; t < hi; ++t) {
      double w = (double)weight[t];
      V3 d = sub(load(xyz, base, atoms[t]), c);
      s00 += w * d.x * d.x; s11 += w * d.y * d.y; s22 += w * d.z * d.z;
      s01 += w * d.x * d.y; s02 += w * d.x * d.z; s12 += w * d.y * d.z;
    }
    V3 n = smallest_eigenvector(s00, s11, s22, s01, s02, s12);
    for (int t = lo; t < hi; ++t) {
      double w = (double)weight[t];
      double dist = dot(n, sub(load(xyz, base, atoms[t]), c));
      e += w * dist * dist;
      // The plane minimises the weighted sum, so only the explicit dependence on x_t remains.
      add_grad(grad, base, atoms[t], scale(n, 2.0 * w * dist));
      if (want_delta) delta[(long long)m * n_members + t] = (real_t)dist;
    }
  }
  add_energy(energy + m, e);
}

extern "C" __global__ void adp_similarity_terms_kernel(
    const real_t* values, const int* atoms, const real_t* weight, int n_atoms, int n_values,
    int n_restr, int want_delta, double* energy, real_t* grad, real_t* delta) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  const int m = blockIdx.y;
  const bool active = r < n_restr;
  const long long base = (long long)m * n_atoms * n_values;
  double e = 0.0, ss = 0.0;
  if (active) {
    int i = atoms[2 * r], j = atoms[2 * r + 1];
    double w = (double)weight[r];
    for (int k = 0; k < n_values; ++k) {
      double diff = (double)values[base + (long long)n_values * i + k] -
                    (double)values[base + (long long)n_values * j + k];
      ss += diff * diff;
      atomicAdd(grad + base + (long long)n_values * i + k, (real_t)(2.0 * w * diff));
      atomicAdd(grad + base + (long long)n_values * j + k, (real_t)(-2.0 * w * diff));
    }
    e = w * ss;
  }
  EPILOGUE(sqrt(ss))
}

// One thread per (model, atom): out (one int, zeroed by the caller) becomes 1 where some atom
// of xyz (B, N, 3) lies farther than sqrt(allowed2) from ref: the nonbonded pair list is stale.
extern "C" __global__ void moved_beyond_kernel(const real_t* __restrict__ xyz,
                                               const real_t* __restrict__ ref,
                                               long long n_points, double allowed2,
                                               int* __restrict__ out) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n_points) return;
  double dx = (double)xyz[3 * i] - (double)ref[3 * i];
  double dy = (double)xyz[3 * i + 1] - (double)ref[3 * i + 1];
  double dz = (double)xyz[3 * i + 2] - (double)ref[3 * i + 2];
  if (dx * dx + dy * dy + dz * dz > allowed2) out[0] = 1;
}
