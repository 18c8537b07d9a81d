// Batched atomic density on a grid and its adjoint.
//
// NumPy twins: cpu_fallback/density.py  spread_density, density_adjoint, cutoff_radii.
// Loader: gpu_refine/cuda.py; gpu_refine/kernel_source.py prepends "#define REAL float|double"
// (nothing else is generated) and gives the options.
//
// Density of one atom (form factor as a sum of G Gaussians a_g, b_g):
//   isotropic:   rho(d) = occ * sum_g a_g (4 pi / Bt)^1.5 exp(-4 pi^2 |d|^2 / Bt),  Bt = b_g + B + blur
//   anisotropic: rho(d) = occ * sum_g a_g (4 pi)^1.5 det(Bm)^-0.5 exp(-4 pi^2 d^T Bm^-1 d),
//                Bm = 8 pi^2 U + (b_g + blur) I
// d = p - x, p = origin + M idx.  Points with |d| < radius are used (radius per model and atom,
// chosen on the host as gemmi does).  Work item = (model, atom, slab along the first grid axis),
// so that a small batch still fills the device.  Each slab visits only the rows, and each row
// only the points, that the sphere |d| < radius cuts (ranges solved from the grid's metric
// M^T M): about half of the atom's bounding box.
//
// Geometry block `geom` (double[21]): index_from_xyz (3x3 row-major), xyz_from_index (3x3),
// origin (3).  `periodic` is a bit mask: bit a set where grid axis a wraps around.
//
// Each kernel comes twice with the same parameters: the general one (anisotropic atoms where
// is_aniso says so) and "_iso", for launches with no anisotropic atom (has_aniso = 0), whose
// compile-time-isotropic body needs far fewer registers (bench/kernels.py).

#ifndef REAL
#define REAL float
#endif

#define NGAUSS 5
#define PI_D 3.14159265358979323846

typedef REAL real_t;

struct AtomFrame {
  double g[3];       // atom position in grid-index coordinates
  int lo[3], hi[3];  // inclusive index range of its bounding box
};

__device__ inline void atom_frame(const double* geom, const real_t* x, double radius,
                                  AtomFrame& f) {
  double dx = (double)x[0] - geom[18], dy = (double)x[1] - geom[19], dz = (double)x[2] - geom[20];
  for (int a = 0; a < 3; ++a) {
    const double* row = geom + 3 * a;
    f.g[a] = row[0] * dx + row[1] * dy + row[2] * dz;
    double half = radius * sqrt(row[0] * row[0] + row[1] * row[1] + row[2] * row[2]);
    f.lo[a] = (int)ceil(f.g[a] - half);
    f.hi[a] = (int)floor(f.g[a] + half);
  }
}

// Index i along an axis of n points; `periodic` is this axis' flag, not the mask.
__device__ inline bool wrap_index(int i, int n, int periodic, int& out) {
  if (periodic) {
    out = ((i % n) + n) % n;
    return true;
  }
  out = i;
  return i >= 0 && i < n;
}

// Index range [lo, hi] (clipped to [lo, hi] as given) of the integers t with
// a (t - c)^2 + 2 b (t - c) + q < 0, a > 0: the points of a row or plane that the sphere cuts.
// Widened by a hair, so that rounding never drops a point inside (|d| < radius is tested
// again at each point).  False where no integer lies in it.
__device__ inline bool quadratic_range(double a, double b, double q, double c, int& lo,
                                       int& hi) {
  double disc = b * b - a * q;
  if (disc < 0.0) return false;
  double root = sqrt(disc), eps = 1e-9 * (1.0 + fabs(c));
  lo = max(lo, (int)ceil(c + (-b - root) / a - eps));
  hi = min(hi, (int)floor(c + (-b + root) / a + eps));
  return lo <= hi;
}

// The grid's metric G = M^T M (M = xyz_from_index): |d|^2 = f^T G f for index offsets f.
struct Metric {
  double g00, g01, g02, g11, g12, g22;
};

__device__ inline Metric grid_metric(const double* M) {
  Metric m;
  m.g00 = M[0] * M[0] + M[3] * M[3] + M[6] * M[6];
  m.g01 = M[0] * M[1] + M[3] * M[4] + M[6] * M[7];
  m.g02 = M[0] * M[2] + M[3] * M[5] + M[6] * M[8];
  m.g11 = M[1] * M[1] + M[4] * M[4] + M[7] * M[7];
  m.g12 = M[1] * M[2] + M[4] * M[5] + M[7] * M[8];
  m.g22 = M[2] * M[2] + M[5] * M[5] + M[8] * M[8];
  return m;
}

// Rows j of the slab at offset fi (from the atom's centre) that the sphere of radius^2 r2
// cuts: |d|^2 minimised over the third index is a quadratic in fj.
__device__ inline bool slab_rows(const Metric& m, double fi, double r2, double cj, int& lo,
                                 int& hi) {
  double a = m.g11 - m.g12 * m.g12 / m.g22;
  double b = fi * (m.g01 - m.g02 * m.g12 / m.g22);
  double q = fi * fi * (m.g00 - m.g02 * m.g02 / m.g22) - r2;
  return quadratic_range(a, b, q, cj, lo, hi);
}

// Points k of the row (fi, fj) inside the sphere.
__device__ inline bool row_points(const Metric& m, double fi, double fj, double r2, double ck,
                                  int& lo, int& hi) {
  double b = m.g02 * fi + m.g12 * fj;
  double q = m.g00 * fi * fi + 2.0 * m.g01 * fi * fj + m.g11 * fj * fj - r2;
  return quadratic_range(m.g22, b, q, ck, lo, hi);
}

// Per-Gaussian precomputation for one atom.  For isotropic atoms only amp[g] and k[g] are used.
struct AtomShape {
  double amp[NGAUSS];
  double k[NGAUSS];            // isotropic: 4 pi^2 / Bt
  double bt[NGAUSS];           // isotropic: Bt
  double s[NGAUSS][6];         // anisotropic: Bm^-1 (11,22,33,12,13,23)
  bool aniso;
};

__device__ inline void atom_shape(const double* coef, double b, const real_t* u, bool aniso,
                                  double blur, AtomShape& sh) {
  const double four_pi = 4.0 * PI_D;
  const double eight_pi2 = 8.0 * PI_D * PI_D;
  sh.aniso = aniso;
  for (int g = 0; g < NGAUSS; ++g) {
    double a = coef[g], bg = coef[NGAUSS + g];
    if (!aniso) {
      double bt = bg + b + blur;
      sh.bt[g] = bt;
      sh.k[g] = PI_D * four_pi / bt;
      double t = four_pi / bt;
      sh.amp[g] = a * t * sqrt(t);  // (4 pi / Bt)^1.5 without pow's slow path
    } else {
      double iso = bg + blur;
      double m11 = eight_pi2 * u[0] + iso, m22 = eight_pi2 * u[1] + iso,
             m33 = eight_pi2 * u[2] + iso;
      double m12 = eight_pi2 * u[3], m13 = eight_pi2 * u[4], m23 = eight_pi2 * u[5];
      double c11 = m22 * m33 - m23 * m23, c22 = m11 * m33 - m13 * m13,
             c33 = m11 * m22 - m12 * m12;
      double c12 = m13 * m23 - m12 * m33, c13 = m12 * m23 - m13 * m22,
             c23 = m12 * m13 - m11 * m23;
      double det = m11 * c11 + m12 * c12 + m13 * c13;
      sh.s[g][0] = c11 / det; sh.s[g][1] = c22 / det; sh.s[g][2] = c33 / det;
      sh.s[g][3] = c12 / det; sh.s[g][4] = c13 / det; sh.s[g][5] = c23 / det;
      sh.amp[g] = a * four_pi * sqrt(four_pi / det);
    }
  }
}

__device__ inline double quad(const double* s, double x, double y, double z) {
  return s[0] * x * x + s[1] * y * y + s[2] * z * z +
         2.0 * (s[3] * x * y + s[4] * x * z + s[5] * y * z);
}

// One work item (model, atom, slab): its frame, shape and first-axis plane, or false if the
// slab lies outside the atom's box or (for a box grid) outside the stored grid.
struct WorkItem {
  long long ma, model;
  int i, iw;
  double r, o;
  AtomFrame f;
  AtomShape sh;
};

template <bool ALLOW_ANISO>
__device__ inline bool work_item(long long tid, const real_t* xyz, const real_t* bfac,
                                 const real_t* uaniso, const unsigned char* is_aniso,
                                 const real_t* occ, const int* stype, const double* coefs,
                                 const real_t* radius, const double* geom, double blur,
                                 int periodic, int has_aniso, long long n_atoms, int n_slabs,
                                 int n0, WorkItem& w) {
  int slab = (int)(tid % n_slabs);
  w.ma = tid / n_slabs;  // model * n_atoms + atom
  long long atom = w.ma % n_atoms;
  w.model = w.ma / n_atoms;
  w.r = (double)radius[w.ma];
  atom_frame(geom, xyz + 3 * w.ma, w.r, w.f);
  w.i = w.f.lo[0] + slab;
  if (w.i > w.f.hi[0] || !wrap_index(w.i, n0, periodic & 1, w.iw)) return false;
  bool aniso = ALLOW_ANISO && has_aniso && is_aniso[atom];
  atom_shape(coefs + 2 * NGAUSS * stype[atom], (double)bfac[w.ma],
             has_aniso ? uaniso + 6 * w.ma : nullptr, aniso, blur, w.sh);
  w.o = (double)occ[w.ma];
  return true;
}

template <bool ALLOW_ANISO>
__device__ inline void spread_density(
    const real_t* __restrict__ xyz, const real_t* __restrict__ bfac,
    const real_t* __restrict__ uaniso, const unsigned char* __restrict__ is_aniso,
    const real_t* __restrict__ occ, const int* __restrict__ stype,
    const double* __restrict__ coefs, const real_t* __restrict__ radius,
    const double* __restrict__ geom, double blur, int periodic, int has_aniso,
    long long n_models, long long n_atoms, int n_slabs, int n0, int n1, int n2,
    real_t* __restrict__ out) {
  long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (tid >= n_models * n_atoms * n_slabs) return;
  WorkItem w;
  if (!work_item<ALLOW_ANISO>(tid, xyz, bfac, uaniso, is_aniso, occ, stype, coefs, radius, geom, blur,
                 periodic, has_aniso, n_atoms, n_slabs, n0, w))
    return;
  const AtomFrame& f = w.f;
  const AtomShape& sh = w.sh;
  const bool aniso = ALLOW_ANISO && sh.aniso;
  const double o = w.o;
  double r2max = w.r * w.r;
  const double* M = geom + 9;
  double fi = w.i - f.g[0];
  real_t* grid = out + w.model * (long long)n0 * n1 * n2 + (long long)w.iw * n1 * n2;
  const Metric gm = grid_metric(M);
  int jlo = f.lo[1], jhi = f.hi[1];
  if (!slab_rows(gm, fi, r2max, f.g[1], jlo, jhi)) return;
  for (int j = jlo; j <= jhi; ++j) {
    int jw;
    if (!wrap_index(j, n1, (periodic >> 1) & 1, jw)) continue;
    double fj = j - f.g[1];
    int klo = f.lo[2], khi = f.hi[2];
    if (!row_points(gm, fi, fj, r2max, f.g[2], klo, khi)) continue;
    for (int k = klo; k <= khi; ++k) {
      int kw;
      if (!wrap_index(k, n2, (periodic >> 2) & 1, kw)) continue;
      double fk = k - f.g[2];
      double dx = M[0] * fi + M[1] * fj + M[2] * fk;
      double dy = M[3] * fi + M[4] * fj + M[5] * fk;
      double dz = M[6] * fi + M[7] * fj + M[8] * fk;
      double d2 = dx * dx + dy * dy + dz * dz;
      if (d2 >= r2max) continue;
      double rho = 0.0;
      for (int g = 0; g < NGAUSS; ++g) {
        double e = aniso ? 4.0 * PI_D * PI_D * quad(sh.s[g], dx, dy, dz) : sh.k[g] * d2;
        rho += sh.amp[g] * exp(-e);
      }
      atomicAdd(grid + (long long)jw * n2 + kw, (real_t)(o * rho));
    }
  }
}

// Adjoint: given dT/drho on the grid of each model (dmap), accumulate
// dT/dxyz (B,N,3), dT/dB (B,N), dT/dU (B,N,6) and dT/docc (B,N).
template <bool ALLOW_ANISO>
__device__ inline void density_adjoint(
    const real_t* __restrict__ xyz, const real_t* __restrict__ bfac,
    const real_t* __restrict__ uaniso, const unsigned char* __restrict__ is_aniso,
    const real_t* __restrict__ occ, const int* __restrict__ stype,
    const double* __restrict__ coefs, const real_t* __restrict__ radius,
    const double* __restrict__ geom, double blur, int periodic, int has_aniso,
    long long n_models, long long n_atoms, int n_slabs, int n0, int n1, int n2,
    const real_t* __restrict__ dmap, real_t* __restrict__ g_xyz, real_t* __restrict__ g_b,
    real_t* __restrict__ g_u, real_t* __restrict__ g_occ) {
  long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (tid >= n_models * n_atoms * n_slabs) return;
  WorkItem w;
  if (!work_item<ALLOW_ANISO>(tid, xyz, bfac, uaniso, is_aniso, occ, stype, coefs, radius, geom, blur,
                 periodic, has_aniso, n_atoms, n_slabs, n0, w))
    return;
  const AtomFrame& f = w.f;
  const AtomShape& sh = w.sh;
  const bool aniso = ALLOW_ANISO && sh.aniso;
  const long long ma = w.ma;
  const double o = w.o;
  double r2max = w.r * w.r;
  const double* M = geom + 9;
  const double four_pi2 = 4.0 * PI_D * PI_D;
  double fi = w.i - f.g[0];
  const real_t* grid = dmap + w.model * (long long)n0 * n1 * n2 + (long long)w.iw * n1 * n2;
  double sx = 0, sy = 0, sz = 0, sb = 0, socc = 0;
  double su[6] = {0, 0, 0, 0, 0, 0};
  const Metric gm = grid_metric(M);
  int jlo = f.lo[1], jhi = f.hi[1];
  if (!slab_rows(gm, fi, r2max, f.g[1], jlo, jhi)) return;
  for (int j = jlo; j <= jhi; ++j) {
    int jw;
    if (!wrap_index(j, n1, (periodic >> 1) & 1, jw)) continue;
    double fj = j - f.g[1];
    int klo = f.lo[2], khi = f.hi[2];
    if (!row_points(gm, fi, fj, r2max, f.g[2], klo, khi)) continue;
    for (int k = klo; k <= khi; ++k) {
      int kw;
      if (!wrap_index(k, n2, (periodic >> 2) & 1, kw)) continue;
      double fk = k - f.g[2];
      double dx = M[0] * fi + M[1] * fj + M[2] * fk;
      double dy = M[3] * fi + M[4] * fj + M[5] * fk;
      double dz = M[6] * fi + M[7] * fj + M[8] * fk;
      double d2 = dx * dx + dy * dy + dz * dz;
      if (d2 >= r2max) continue;
      double w = (double)grid[(long long)jw * n2 + kw];
      if (w == 0.0) continue;
      for (int g = 0; g < NGAUSS; ++g) {
        if (!aniso) {
          double rho = sh.amp[g] * exp(-sh.k[g] * d2);
          double wr = w * rho;
          socc += wr;
          // d rho / d x = rho * 2k d ; d rho / d B = rho (k d2 / Bt - 1.5 / Bt)
          double c = 2.0 * sh.k[g] * wr;
          sx += c * dx; sy += c * dy; sz += c * dz;
          sb += wr * (sh.k[g] * d2 - 1.5) / sh.bt[g];
        } else {
          const double* s = sh.s[g];
          double rho = sh.amp[g] * exp(-four_pi2 * quad(s, dx, dy, dz));
          double wr = w * rho;
          socc += wr;
          double vx = s[0] * dx + s[3] * dy + s[4] * dz;  // S d
          double vy = s[3] * dx + s[1] * dy + s[5] * dz;
          double vz = s[4] * dx + s[5] * dy + s[2] * dz;
          double c = 2.0 * four_pi2 * wr;
          sx += c * vx; sy += c * vy; sz += c * vz;
          // d rho / d Bm = rho (-S/2 + 4 pi^2 S d d^T S); dU = 8 pi^2 dBm, off-diagonals twice
          double e = 8.0 * PI_D * PI_D * wr;
          su[0] += e * (-0.5 * s[0] + four_pi2 * vx * vx);
          su[1] += e * (-0.5 * s[1] + four_pi2 * vy * vy);
          su[2] += e * (-0.5 * s[2] + four_pi2 * vz * vz);
          su[3] += 2.0 * e * (-0.5 * s[3] + four_pi2 * vx * vy);
          su[4] += 2.0 * e * (-0.5 * s[4] + four_pi2 * vx * vz);
          su[5] += 2.0 * e * (-0.5 * s[5] + four_pi2 * vy * vz);
        }
      }
    }
  }
  atomicAdd(g_xyz + 3 * ma, (real_t)(o * sx));
  atomicAdd(g_xyz + 3 * ma + 1, (real_t)(o * sy));
  atomicAdd(g_xyz + 3 * ma + 2, (real_t)(o * sz));
  atomicAdd(g_occ + ma, (real_t)socc);
  if (aniso) {
    for (int c = 0; c < 6; ++c) atomicAdd(g_u + 6 * ma + c, (real_t)(o * su[c]));
  } else {
    atomicAdd(g_b + ma, (real_t)(o * sb));
  }
}

// The kernels: general and isotropic-only instances of the two bodies above.

#define SPREAD_ARGS \
  xyz, bfac, uaniso, is_aniso, occ, stype, coefs, radius, geom, blur, periodic, has_aniso, \
      n_models, n_atoms, n_slabs, n0, n1, n2

extern "C" __global__ void spread_density_kernel(
    const real_t* __restrict__ xyz, const real_t* __restrict__ bfac,
    const real_t* __restrict__ uaniso, const unsigned char* __restrict__ is_aniso,
    const real_t* __restrict__ occ, const int* __restrict__ stype,
    const double* __restrict__ coefs, const real_t* __restrict__ radius,
    const double* __restrict__ geom, double blur, int periodic, int has_aniso,
    long long n_models, long long n_atoms, int n_slabs, int n0, int n1, int n2,
    real_t* __restrict__ out) {
  spread_density<true>(SPREAD_ARGS, out);
}

extern "C" __global__ void spread_density_iso_kernel(
    const real_t* __restrict__ xyz, const real_t* __restrict__ bfac,
    const real_t* __restrict__ uaniso, const unsigned char* __restrict__ is_aniso,
    const real_t* __restrict__ occ, const int* __restrict__ stype,
    const double* __restrict__ coefs, const real_t* __restrict__ radius,
    const double* __restrict__ geom, double blur, int periodic, int has_aniso,
    long long n_models, long long n_atoms, int n_slabs, int n0, int n1, int n2,
    real_t* __restrict__ out) {
  spread_density<false>(SPREAD_ARGS, out);
}

extern "C" __global__ void density_adjoint_kernel(
    const real_t* __restrict__ xyz, const real_t* __restrict__ bfac,
    const real_t* __restrict__ uaniso, const unsigned char* __restrict__ is_aniso,
    const real_t* __restrict__ occ, const int* __restrict__ stype,
    const double* __restrict__ coefs, const real_t* __restrict__ radius,
    const double* __restrict__ geom, double blur, int periodic, int has_aniso,
    long long n_models, long long n_atoms, int n_slabs, int n0, int n1, int n2,
    const real_t* __restrict__ dmap, real_t* __restrict__ g_xyz, real_t* __restrict__ g_b,
    real_t* __restrict__ g_u, real_t* __restrict__ g_occ) {
  density_adjoint<true>(SPREAD_ARGS, dmap, g_xyz, g_b, g_u, g_occ);
}

extern "C" __global__ void density_adjoint_iso_kernel(
    const real_t* __restrict__ xyz, const real_t* __restrict__ bfac,
    const real_t* __restrict__ uaniso, const unsigned char* __restrict__ is_aniso,
    const real_t* __restrict__ occ, const int* __restrict__ stype,
    const double* __restrict__ coefs, const real_t* __restrict__ radius,
    const double* __restrict__ geom, double blur, int periodic, int has_aniso,
    long long n_models, long long n_atoms, int n_slabs, int n0, int n1, int n2,
    const real_t* __restrict__ dmap, real_t* __restrict__ g_xyz, real_t* __restrict__ g_b,
    real_t* __restrict__ g_u, real_t* __restrict__ g_occ) {
  density_adjoint<false>(SPREAD_ARGS, dmap, g_xyz, g_b, g_u, g_occ);
}

// Radius of every (model, atom): where its isotropic density at total B falls to `cutoff`, by
// gemmi's search (cpu_fallback/density.py cutoff_radii): 0.5 A steps from a first guess,
// inwards while below the cutoff, else outwards while above, then linear interpolation.
// Total B: B + blur, or 8 pi^2 max(U11, U22, U33) + blur for an anisotropic atom.
__device__ inline double radial_density(const double* coef, double bt, double x) {
  double rho = 0.0;
  for (int g = 0; g < NGAUSS; ++g) {
    double btot = coef[NGAUSS + g] + bt;
    double t = 4.0 * PI_D / btot;
    rho += coef[g] * t * sqrt(t) * exp(-PI_D * 4.0 * PI_D / btot * x * x);
  }
  return fabs(rho);
}

extern "C" __global__ void cutoff_radius_kernel(
    const real_t* __restrict__ bfac, const real_t* __restrict__ uaniso,
    const unsigned char* __restrict__ is_aniso, const int* __restrict__ stype,
    const double* __restrict__ coefs, double blur, int has_aniso, double cutoff,
    int max_steps, long long n_models, long long n_atoms, real_t* __restrict__ out) {
  long long ma = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (ma >= n_models * n_atoms) return;
  long long atom = ma % n_atoms;
  double bt = (double)bfac[ma] + blur;
  if (has_aniso && is_aniso[atom]) {
    const real_t* u = uaniso + 6 * ma;
    bt = 8.0 * PI_D * PI_D * fmax(fmax((double)u[0], (double)u[1]), (double)u[2]) + blur;
  }
  const double* coef = coefs + 2 * NGAUSS * stype[atom];
  double x1 = (8.5 + 0.075 * bt) / (2.4 + 0.0045 * bt);
  double y1 = radial_density(coef, bt, x1);
  double x2 = x1, y2 = y1;
  if (y1 < cutoff) {
    for (int step = 0; step < max_steps; ++step) {
      x2 = x1;
      y2 = y1;
      x1 = fmax(x1 - 0.5, 0.0);
      y1 = radial_density(coef, bt, x1);
      if (!(y1 < cutoff && x1 > 0)) break;
    }
  } else {
    for (int step = 0; step < max_steps; ++step) {
      x1 = x2;
      y1 = y2;
      x2 += 0.5;
      y2 = radial_density(coef, bt, x2);
      if (!(y2 > cutoff)) break;
    }
  }
  double denom = y1 == y2 ? 1.0 : y1 - y2;
  out[ma] = (real_t)(x1 + (x1 - x2) / denom * (cutoff - y1));
}
