// aenet Chebyshev (AUC) descriptor: per-centre math shared by the CPU operators
// (chebyshev_cpu.cpp) and the CUDA kernels (chebyshev_cuda.cu).
//
// Everything here is plain C++17 with host-device inline functions: no torch headers, so that
// the .cu file compiles with a bare `nvcc -c -std=c++17`.
//
// Definitions (all species share the parameters; s_t = typespin of species t):
//   fc(r)      = 0.5 (cos(pi r / Rc) + 1)  for r < Rc, else 0
//   radial_n   = sum_j T_n(2 r_ij / Rc_r - 1) fc_r(r_ij)                          n = 0..N_r
//   angular_n  = sum_{j<k} T_n(cos theta_ijk) fc_a(r_ij) fc_a(r_ik)               n = 0..N_a
//   weighted copies (only with more than one species): radial by s_j, angular by s_j s_k.
//   Row layout: [radial, angular, radial_w, angular_w].
// "j<k" runs over unordered pairs of entries of the centre's neighbour list (a periodic image
// is its own entry), restricted to entries with r < Rc_a.
//
// The neighbour list is CSR: pairs p in [ptr[i], ptr[i+1]) have centre i, neighbour pj[p] and
// Cartesian shift shift[p] so that r_ij = pos[j] - pos[i] + shift[p].
//
// Three per-centre routines, each touching only the centre's own pairs and triplets:
//   centre_forward : G_i (accumulated in double);
//   centre_vjp     : for dE/dG_i = g, the gradient of g.G_i w.r.t. every pair vector r_p of i
//                    (written to gp[p]) and the centre's own term dE/dR_i = -sum_p gp[p];
//                    the caller then scatters dE/dR_j += gp[p] (no dG/dR is stored);
//   centre_jvp_hvp : for a position tangent v, J v = dG_i/dR . v (the double-backward product
//                    with respect to dE/dG), and optionally the Hessian-vector product of g.G_i
//                    (the double-backward term with respect to positions), per pair like vjp.
// All arithmetic is in double whatever the storage type.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DM_HD __host__ __device__ inline
#elif defined(__GNUC__)
// always inlined on the host so that the CPU file can compile the per-centre routines once per
// instruction set (generic x86-64 and AVX2+FMA, chosen at run time)
#define DM_HD inline __attribute__((always_inline))
#else
#define DM_HD inline
#endif
#define DM_RESTRICT __restrict__

// "#pragma omp simd" on the host when OpenMP is enabled (the CPU build uses -fopenmp): lets the
// compiler vectorise the inner triplet loops with reductions (reassociated sums).
#if defined(_OPENMP) && !defined(__CUDACC__)
#define DM_PRAGMA(x) _Pragma(#x)
#else
#define DM_PRAGMA(x)
#endif
#define DM_SIMD(clauses) DM_PRAGMA(omp simd clauses)

// Nine named accumulators X0..X8 (angular orders up to kMaxSpecialised = 8): named scalars,
// unlike array elements, are kept in registers and reduced by "omp simd".
#define DM_APPLY9(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8)
#define DM_LIST9(P) P##0, P##1, P##2, P##3, P##4, P##5, P##6, P##7, P##8
#define DM_DECLARE_ACC9(P) \
  double P##0 = 0.0, P##1 = 0.0, P##2 = 0.0, P##3 = 0.0, P##4 = 0.0, P##5 = 0.0, P##6 = 0.0, \
         P##7 = 0.0, P##8 = 0.0

namespace distmlip {
namespace cheb {

constexpr int kMaxOrder = 32;  // largest N_r / N_a supported (local arrays of kMaxOrder + 1)
constexpr double kPi = 3.14159265358979323846;

// Per-centre scratch ("slot") holds, for the neighbours with r < Rc_a, these fields in
// structure-of-arrays layout: slot[field * cap + m].
enum SlotField : int {
  fUX = 0, fUY, fUZ, fIR, fF, fDF, fD2F, fS, fPIDX, fGX, fGY, fGZ, fDRX, fDRY, fDRZ, fDP,
  kSlotFields
};

// Pointers to every per-centre slot field, named as in the routines below (ux .. vp).
#define DM_SLOT_POINTERS(slot, cap)                      \
  double* DM_RESTRICT ux = (slot) + fUX * (cap);         \
  double* DM_RESTRICT uy = (slot) + fUY * (cap);         \
  double* DM_RESTRICT uz = (slot) + fUZ * (cap);         \
  double* DM_RESTRICT ir = (slot) + fIR * (cap);         \
  double* DM_RESTRICT ff = (slot) + fF * (cap);          \
  double* DM_RESTRICT dff = (slot) + fDF * (cap);        \
  double* DM_RESTRICT d2ff = (slot) + fD2F * (cap);      \
  double* DM_RESTRICT ss = (slot) + fS * (cap);          \
  double* DM_RESTRICT pid = (slot) + fPIDX * (cap);      \
  double* DM_RESTRICT gx = (slot) + fGX * (cap);         \
  double* DM_RESTRICT gy = (slot) + fGY * (cap);         \
  double* DM_RESTRICT gz = (slot) + fGZ * (cap);         \
  double* DM_RESTRICT vx = (slot) + fDRX * (cap);        \
  double* DM_RESTRICT vy = (slot) + fDRY * (cap);        \
  double* DM_RESTRICT vz = (slot) + fDRZ * (cap);        \
  double* DM_RESTRICT vp = (slot) + fDP * (cap)

template <typename scalar_t>
struct Problem {
  const scalar_t* pos;      // [N, 3]
  const int64_t* species;   // [N]  index into typespin
  const int64_t* ptr;       // [N + 1]
  const int64_t* pj;        // [P]
  const scalar_t* shift;    // [P, 3]
  const double* typespin;   // [T]
  int64_t n_atoms;
  int64_t n_pairs;
  double rc_r;
  double rc_a;
  int n_r;
  int n_a;
  int weighted;             // 1 when T > 1: weighted copies present
  // angular sums in moment form for centres with at least this many neighbours within rc_a
  // (host code only; see angular_forward_moments)
  int64_t moments_min = int64_t(1) << 40;
  // host JVP only: a homogeneous strain tangent per structure ([B, 3, 3], row vectors) whose
  // pair tangents r_p strain[structure[i]] are added to those of the positions (the weight
  // gradient of a stress loss runs the same JVP in the strain direction); nullptr: positions only
  const double* strain = nullptr;
  const int64_t* structure = nullptr;

  DM_HD int off_a() const { return n_r + 1; }
  DM_HD int off_wr() const { return n_r + n_a + 2; }
  DM_HD int off_wa() const { return 2 * n_r + n_a + 3; }
  DM_HD int dim() const { return (n_r + n_a + 2) * (weighted ? 2 : 1); }
};

DM_HD int descriptor_dim(int n_r, int n_a, bool weighted) {
  return (n_r + n_a + 2) * (weighted ? 2 : 1);
}

// Cutoff function and its first two derivatives (zero beyond rc).
struct Cutoff {
  double f, df, d2f;
};

// sin and cos of y in [-pi/2, pi/2] by their Taylor series to degree 21 / 22 (truncation below
// 1.3e-18; a few ulp of rounding): branch-free and inlinable, unlike libm's cos / sin calls,
// which dominated the per-pair cost of the kernels.
template <int N>
DM_HD double horner(const double (&c)[N], double x) {  // c[0] x^(N-1) + ... + c[N-1]
  double p = c[0];
#if defined(__CUDACC__)
#pragma unroll
#elif defined(__GNUC__)
#pragma GCC unroll 32  // fully unrolled: no inner loop, so callers' "omp simd" loops vectorise
#endif
  for (int k = 1; k < N; ++k) p = p * x + c[k];
  return p;
}

DM_HD void sincos_half_pi(double y, double& sn, double& cs) {
  // (-1)^k / (2k+1)! and (-1)^k / (2k)!, highest degree first
  const double ks[11] = {1.9572941063391263e-20, -8.22063524662433e-18, 2.8114572543455206e-15,
                         -7.647163731819816e-13, 1.6059043836821613e-10, -2.505210838544172e-08,
                         2.7557319223985893e-06, -0.0001984126984126984, 0.008333333333333333,
                         -0.16666666666666666, 1.0};
  const double kc[12] = {-8.896791392450574e-22, 4.110317623312165e-19, -1.5619206968586225e-16,
                         4.779477332387385e-14, -1.1470745597729725e-11, 2.08767569878681e-09,
                         -2.755731922398589e-07, 2.48015873015873e-05, -0.001388888888888889,
                         0.041666666666666664, -0.5, 1.0};
  const double y2 = y * y;
  sn = horner(ks, y2) * y;
  cs = horner(kc, y2);
}

// cos(pi r / rc) and sin(pi r / rc) for 0 <= r <= rc: with y = pi (r / rc - 1/2),
// cos(pi r / rc) = -sin(y), sin(pi r / rc) = cos(y).
DM_HD void cutoff_trig(double r, double rc, double& cs, double& sn) {
  double s_y, c_y;
  sincos_half_pi(kPi * (r / rc - 0.5), s_y, c_y);
  cs = -s_y;
  sn = c_y;
}

// the same with a = pi / rc given (no division: the host pair passes, vectorised)
DM_HD void cutoff_trig_a(double r, double a, double& cs, double& sn) {
  double s_y, c_y;
  sincos_half_pi(a * r - 0.5 * kPi, s_y, c_y);
  cs = -s_y;
  sn = c_y;
}

DM_HD Cutoff cutoff_fn(double r, double rc) {
  Cutoff c{0.0, 0.0, 0.0};
  if (r < rc) {
    const double a = kPi / rc;
    double cs, sn;
    cutoff_trig(r, rc, cs, sn);
    c.f = 0.5 * (cs + 1.0);
    c.df = -0.5 * a * sn;
    c.d2f = -0.5 * a * a * cs;
  }
  return c;
}

DM_HD double cutoff_value(double r, double rc) {
  if (!(r < rc)) return 0.0;
  double cs, sn;
  cutoff_trig(r, rc, cs, sn);
  return 0.5 * (cs + 1.0);
}

// r_ij vector of pair p (centre i) in double; returns |r_ij|.
template <typename scalar_t>
DM_HD double pair_vector(const Problem<scalar_t>& P, int64_t i, int64_t p, double* d) {
  const int64_t j = P.pj[p];
  d[0] = double(P.pos[3 * j + 0]) - double(P.pos[3 * i + 0]) + double(P.shift[3 * p + 0]);
  d[1] = double(P.pos[3 * j + 1]) - double(P.pos[3 * i + 1]) + double(P.shift[3 * p + 1]);
  d[2] = double(P.pos[3 * j + 2]) - double(P.pos[3 * i + 2]) + double(P.shift[3 * p + 2]);
  return sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]);
}

template <typename scalar_t>
DM_HD double neighbour_spin(const Problem<scalar_t>& P, int64_t p) {
  return P.weighted ? P.typespin[P.species[P.pj[p]]] : 0.0;
}

// Order of the angular sums: compile-time when NAC >= 0 (lets the compiler keep the
// accumulators in registers), else the runtime value.
template <int NAC, typename scalar_t>
DM_HD int angular_order(const Problem<scalar_t>& P) {
  return NAC >= 0 ? NAC : P.n_a;
}

// ------------------------------------------------------------------------------------------
// helpers for the angular sums
// ------------------------------------------------------------------------------------------

// Monomial coefficients of T_0..T_na: T_n(c) = sum_k tc[n * (na + 1) + k] c^k.  Used only for
// na <= kMaxSpecialised (coefficients up to 2^(na-1); conditioning is harmless there).
constexpr int kMaxSpecialised = 8;

// Doubles per atom of the forward's moments row (host moment form, orders up to
// kMaxSpecialised; 0 otherwise): [flag, d0, d0w, M (C(na + 3, 3)), MW (C(na + 3, 3))], flag 1 when
// the centre's angular sums used the moment form (see angular_forward_moments).
DM_HD int moments_row_size(int na) {
  return na <= kMaxSpecialised ? 3 + (na + 1) * (na + 2) * (na + 3) / 3 : 0;
}

DM_HD void cheb_monomial(int na, double* tc) {
  const int K = na + 1;
  for (int q = 0; q < K * K; ++q) tc[q] = 0.0;
  tc[0] = 1.0;
  if (na >= 1) tc[K + 1] = 1.0;
  for (int n = 2; n <= na; ++n)
    for (int k = 0; k <= n; ++k)
      tc[n * K + k] = (k >= 1 ? 2.0 * tc[(n - 1) * K + k - 1] : 0.0) - tc[(n - 2) * K + k];
}

// S(c) = sum_n w_n T_n(c) and derivatives, w_n = ga_n + sab * gwa_n.
// NAC >= 0: Horner on monomial coefficients al (from ga) and be (from gwa), [NAC + 1] each.
// NAC < 0: Chebyshev recurrences on ga, gwa directly (any order).
template <int NAC, int DERIV>
DM_HD void angular_poly(double c, double sab, int na, const double* al, const double* be,
                        double& S, double& S1, double& S2) {
  if (NAC >= 0) {
    const int N = NAC >= 0 ? NAC : 0;
    double s0 = al[N] + sab * be[N];
    double s1 = 0.0, s2 = 0.0;
    for (int k = N - 1; k >= 0; --k) {
      if (DERIV >= 2) s2 = s2 * c + 2.0 * s1;
      if (DERIV >= 1) s1 = s1 * c + s0;
      s0 = s0 * c + (al[k] + sab * be[k]);
    }
    S = s0;
    S1 = s1;
    S2 = s2;
  } else {
    double s0 = 0.0, s1 = 0.0, s2 = 0.0;
    double tm = 1.0, t = c, dtm = 0.0, dt = 1.0, d2tm = 0.0, d2t = 0.0;
    for (int n = 0; n <= na; ++n) {
      double tn, dtn, d2tn;
      if (n == 0) {
        tn = 1.0; dtn = 0.0; d2tn = 0.0;
      } else if (n == 1) {
        tn = c; dtn = 1.0; d2tn = 0.0;
      } else {
        tn = 2.0 * c * t - tm;
        dtn = 2.0 * t + 2.0 * c * dt - dtm;
        d2tn = 4.0 * dt + 2.0 * c * d2t - d2tm;
        tm = t; t = tn;
        dtm = dt; dt = dtn;
        d2tm = d2t; d2t = d2tn;
      }
      const double wn = al[n] + sab * be[n];
      s0 += wn * tn;
      if (DERIV >= 1) s1 += wn * dtn;
      if (DERIV >= 2) s2 += wn * d2tn;
    }
    S = s0;
    S1 = s1;
    S2 = s2;
  }
}

// Coefficients used by angular_poly: monomial (NAC >= 0) or the Chebyshev ones (NAC < 0).
template <int NAC>
DM_HD void angular_coefficients(int na, const double* ga, const double* gwa, double* al,
                                double* be) {
  if (NAC >= 0) {
    double tc[(kMaxSpecialised + 1) * (kMaxSpecialised + 1)];
    cheb_monomial(na, tc);
    const int K = na + 1;
    for (int k = 0; k <= na; ++k) {
      double x = 0.0, y = 0.0;
      for (int n = k; n <= na; ++n) {
        x += ga[n] * tc[n * K + k];
        y += gwa[n] * tc[n * K + k];
      }
      al[k] = x;
      be[k] = y;
    }
  } else {
    for (int n = 0; n <= na; ++n) {
      al[n] = ga[n];
      be[n] = gwa[n];
    }
  }
}


// ------------------------------------------------------------------------------------------
// angular sums in moment form (host only): linear in the number of neighbours
// ------------------------------------------------------------------------------------------
// With T_n(c) = sum_k t_nk c^k and c_ab = u_a . u_b (unit vectors, c_aa = 1):
//   sum_{a<b} c_ab^k f_a f_b = 0.5 (sum_{a,b} (u_a . u_b)^k f_a f_b - sum_a f_a^2)
//                            = 0.5 (sum_{|q| = k} mult_q M_q^2 - sum_a f_a^2),
//   M_q = sum_a f_a u_a^q  over the monomials u^q = ux^i uy^j uz^l of degree i + j + l = k,
//   mult_q = k! / (i! j! l!).
// (the weighted copy uses f_a s_a).  One pass over the neighbours builds the C(na + 3, 3)
// moments (35 for na = 4; only the 25 of degree na - 1 and na are accumulated, the others follow
// from |u| = 1, see MonoTable::NLOW) instead of the m (m - 1) / 2 triplets; the VJP needs a second
// pass (value and gradient of a polynomial in u per neighbour), the JVP one pass (moments and
// their directional derivatives together).  When the forward kept its moments (force training,
// chebyshev_forward_moments) the VJP runs only its second pass and the JVP accumulates only the
// derivatives.  Chosen per centre when the neighbour count within the
// angular cutoff is at least Problem::moments_min; the triplet form is kept for the position
// Hessian and for orders above kMaxSpecialised, and on the GPU.
#if !defined(__CUDACC__)

// Four doubles in one vector register (GCC/Clang vector extension; lowered to AVX2 in the AVX2
// build and to SSE2 pairs in the generic one).  The radial sums below are written with it: the
// plain loops over the lanes of a block, with accumulators indexed by the order, were not
// vectorised by gcc (scalar code, each accumulator through memory).  The moment-form angular
// sums run over four neighbours at a time the same way.
typedef double hv4 __attribute__((vector_size(32)));
typedef double hv4u __attribute__((vector_size(32), aligned(8), may_alias));
DM_HD hv4 hv_load(const double* p) { return *reinterpret_cast<const hv4u*>(p); }
DM_HD hv4 hv_splat(double s) { return hv4{s, s, s, s}; }
DM_HD double hv_sum(hv4 v) { return (v[0] + v[1]) + (v[2] + v[3]); }

// the first n (>= 1) of four doubles, the rest zero
DM_HD hv4 hv_load_n(const double* p, int64_t n) {
  if (n >= 4) return hv_load(p);
  hv4 v = hv_splat(0.0);
  for (int64_t l = 0; l < n; ++l) v[l] = p[l];
  return v;
}
DM_HD void set_all(double& v, double s) { v = s; }
DM_HD void set_all(hv4& v, double s) { v = hv_splat(s); }

constexpr int mono_count(int na) { return (na + 1) * (na + 2) * (na + 3) / 6; }

template <int NA>
struct MonoTable {
  static constexpr int N = mono_count(NA);
  static constexpr int NG = NA >= 1 ? mono_count(NA - 1) : 1;  // monomials of degree < NA
  // Monomials of degree < NA - 1 (the first NLOW) are never accumulated over the neighbours: on
  // the unit sphere u^q = u^q (ux^2 + uy^2 + uz^2), so their moments are sums of three moments
  // of degree two more, and in the end of those of degree NA - 1 and NA (25 accumulated moments
  // instead of 35 for NA = 4).  NG0: first monomial of degree NA - 2 (gradient polynomials).
  static constexpr int NLOW = NA >= 2 ? mono_count(NA - 2) : 0;
  static constexpr int NG0 = NA >= 3 ? mono_count(NA - 3) : 0;
  int ex[N], ey[N], ez[N], deg[N];
  int dx[N], dy[N], dz[N];  // index of the monomial with one power of x / y / z less (or 0)
  int ux2[N], uy2[N], uz2[N];  // index of the monomial with two more powers of x / y / z (or 0)
  double mult[N];
  constexpr int find(int a, int b, int c) const {
    for (int q = 0; q < N; ++q)
      if (ex[q] == a && ey[q] == b && ez[q] == c) return q;
    return 0;
  }
  constexpr MonoTable()
      : ex(), ey(), ez(), deg(), dx(), dy(), dz(), ux2(), uy2(), uz2(), mult() {
    double fact[NA + 1] = {};
    fact[0] = 1.0;
    for (int t = 1; t <= NA; ++t) fact[t] = fact[t - 1] * t;
    int q = 0;
    for (int k = 0; k <= NA; ++k)
      for (int a = k; a >= 0; --a)
        for (int b = k - a; b >= 0; --b) {
          ex[q] = a;
          ey[q] = b;
          ez[q] = k - a - b;
          deg[q] = k;
          mult[q] = fact[k] / (fact[a] * fact[b] * fact[k - a - b]);
          ++q;
        }
    for (int r = 0; r < N; ++r) {
      dx[r] = ex[r] > 0 ? find(ex[r] - 1, ey[r], ez[r]) : 0;
      dy[r] = ey[r] > 0 ? find(ex[r], ey[r] - 1, ez[r]) : 0;
      dz[r] = ez[r] > 0 ? find(ex[r], ey[r], ez[r] - 1) : 0;
      ux2[r] = deg[r] + 2 <= NA ? find(ex[r] + 2, ey[r], ez[r]) : 0;
      uy2[r] = deg[r] + 2 <= NA ? find(ex[r], ey[r] + 2, ez[r]) : 0;
      uz2[r] = deg[r] + 2 <= NA ? find(ex[r], ey[r], ez[r] + 2) : 0;
    }
  }
};

template <int NA>
inline constexpr MonoTable<NA> kMono{};

// moments of degree < NA - 1 from the accumulated ones (see MonoTable::NLOW); highest first
template <int NA>
DM_HD void moments_contract(double* M) {
  constexpr const MonoTable<NA>& T = kMono<NA>;
  for (int q = T.NLOW - 1; q >= 0; --q) M[q] = M[T.ux2[q]] + M[T.uy2[q]] + M[T.uz2[q]];
}

// the adjoint: coefficients b of the moments of degree < NA - 1 moved onto the accumulated ones
// (the polynomial sum_q b_q u^q keeps its values on the unit sphere); lowest first
template <int NA>
DM_HD void moments_contract_adjoint(double* b) {
  constexpr const MonoTable<NA>& T = kMono<NA>;
  for (int q = 0; q < T.NLOW; ++q) {
    b[T.ux2[q]] += b[q];
    b[T.uy2[q]] += b[q];
    b[T.uz2[q]] += b[q];
    b[q] = 0.0;
  }
}

template <int NA, typename V>
DM_HD void monomials(V x, V y, V z, V* mono) {
  constexpr const MonoTable<NA>& T = kMono<NA>;
  V px[NA + 1], py[NA + 1], pz[NA + 1];
  set_all(px[0], 1.0);
  py[0] = pz[0] = px[0];
  for (int k = 1; k <= NA; ++k) {
    px[k] = px[k - 1] * x;
    py[k] = py[k - 1] * y;
    pz[k] = pz[k - 1] * z;
  }
#if defined(__GNUC__) && !defined(__CUDACC__)
#pragma GCC unroll 256  // table indices become constants
#endif
  for (int q = 0; q < T.N; ++q) mono[q] = px[T.ex[q]] * py[T.ey[q]] * pz[T.ez[q]];
}

// Q_k (monomial angular sums) -> Chebyshev orders n: out[n] = sum_k t_nk Q_k
template <int NA>
DM_HD void monomial_to_chebyshev(const double* Q, double* out) {
  double tc[(NA + 1) * (NA + 1)];
  cheb_monomial(NA, tc);
  for (int n = 0; n <= NA; ++n) {
    double x = 0.0;
    for (int k = 0; k <= n; ++k) x += tc[n * (NA + 1) + k] * Q[k];
    out[n] = x;
  }
}

// Moments M_q = sum_a f_a u_a^q and MW_q = sum_a f_a s_a u_a^q; returns sum_a f_a^2 and
// sum_a (f_a s_a)^2 in d0, d0w.  Four neighbours per step (hv4 lanes; a short last block is
// zero-filled: f = 0 adds nothing).
template <int NA>
DM_HD void angular_moments(int64_t m, const double* ux, const double* uy, const double* uz,
                           const double* ff, const double* ss, double* M, double* MW, double& d0,
                           double& d0w) {
  constexpr int NM = MonoTable<NA>::N;
  constexpr int NL = MonoTable<NA>::NLOW;
  hv4 vM[NM], vW[NM];
  const hv4 zero = hv_splat(0.0);
  for (int q = NL; q < NM; ++q) vM[q] = vW[q] = zero;
  hv4 v0 = zero, v0w = zero;
  for (int64_t a = 0; a < m; a += 4) {
    const int64_t n = m - a;
    hv4 mono[NM];
    monomials<NA>(hv_load_n(ux + a, n), hv_load_n(uy + a, n), hv_load_n(uz + a, n), mono);
    const hv4 f = hv_load_n(ff + a, n), fs = f * hv_load_n(ss + a, n);
#if defined(__GNUC__)
#pragma GCC unroll 256
#endif
    for (int q = NL; q < NM; ++q) {
      vM[q] += f * mono[q];
      vW[q] += fs * mono[q];
    }
    v0 += f * f;
    v0w += fs * fs;
  }
  for (int q = NL; q < NM; ++q) {
    M[q] = hv_sum(vM[q]);
    MW[q] = hv_sum(vW[q]);
  }
  moments_contract<NA>(M);
  moments_contract<NA>(MW);
  d0 = hv_sum(v0);
  d0w = hv_sum(v0w);
}

// Forward: A[n] = sum_{a<b} T_n(c_ab) f_a f_b, W[n] the same weighted by s_a s_b.
// mom (optional): the centre's moments row [1, d0, d0w, M (NM), MW (NM)] (moments_row_size),
// kept by the force-training forward so that the VJP and JVP need not rebuild the moments.
template <int NA>
DM_HD void angular_forward_moments(int64_t m, const double* ux, const double* uy,
                                   const double* uz, const double* ff, const double* ss,
                                   double* A, double* W, double* mom = nullptr) {
  constexpr const MonoTable<NA>& T = kMono<NA>;
  constexpr int NM = MonoTable<NA>::N;
  double M[NM], MW[NM], d0, d0w;
  angular_moments<NA>(m, ux, uy, uz, ff, ss, M, MW, d0, d0w);
  if (mom != nullptr) {
    mom[0] = 1.0;
    mom[1] = d0;
    mom[2] = d0w;
    for (int q = 0; q < NM; ++q) {
      mom[3 + q] = M[q];
      mom[3 + NM + q] = MW[q];
    }
  }
  double Q[NA + 1], QW[NA + 1];
  for (int k = 0; k <= NA; ++k) Q[k] = QW[k] = 0.0;
  for (int q = 0; q < NM; ++q) {
    Q[T.deg[q]] += T.mult[q] * M[q] * M[q];
    QW[T.deg[q]] += T.mult[q] * MW[q] * MW[q];
  }
  for (int k = 0; k <= NA; ++k) {
    Q[k] = 0.5 * (Q[k] - d0);
    QW[k] = 0.5 * (QW[k] - d0w);
  }
  monomial_to_chebyshev<NA>(Q, A);
  monomial_to_chebyshev<NA>(QW, W);
}

// VJP: for E = sum_k al_k Q_k + be_k QW_k (al, be: monomial coefficients of dE/dG), adds
// dE/d r_a (pair vector of neighbour a) to (gx, gy, gz)[a].
template <int NA>
DM_HD void angular_vjp_moments(int64_t m, const double* ux, const double* uy, const double* uz,
                               const double* ir, const double* ff, const double* dff,
                               const double* ss, const double* al, const double* be, double* gx,
                               double* gy, double* gz, const double* mom = nullptr) {
  constexpr const MonoTable<NA>& T = kMono<NA>;
  constexpr int NM = MonoTable<NA>::N;
  constexpr int NG = MonoTable<NA>::NG;
  double M[NM], MW[NM], d0, d0w;
  if (mom != nullptr) {  // moments kept by the forward: one pass over the neighbours, not two
    for (int q = 0; q < NM; ++q) {
      M[q] = mom[3 + q];
      MW[q] = mom[3 + NM + q];
    }
  } else {
    angular_moments<NA>(m, ux, uy, uz, ff, ss, M, MW, d0, d0w);
  }
  // dE/dM_q and the coefficients of its gradient polynomials (degree < NA)
  double bV[NM], bW[NM], cx[NG], cy[NG], cz[NG], cxw[NG], cyw[NG], czw[NG];
  for (int q = 0; q < NG; ++q) cx[q] = cy[q] = cz[q] = cxw[q] = cyw[q] = czw[q] = 0.0;
  double sal = 0.0, sbe = 0.0;
  for (int k = 0; k <= NA; ++k) {
    sal += al[k];
    sbe += be[k];
  }
  for (int q = 0; q < NM; ++q) {
    bV[q] = al[T.deg[q]] * T.mult[q] * M[q];
    bW[q] = be[T.deg[q]] * T.mult[q] * MW[q];
  }
  moments_contract_adjoint<NA>(bV);
  moments_contract_adjoint<NA>(bW);
  for (int q = T.NLOW; q < NM; ++q) {
    if (T.ex[q] > 0) {
      cx[T.dx[q]] += T.ex[q] * bV[q];
      cxw[T.dx[q]] += T.ex[q] * bW[q];
    }
    if (T.ey[q] > 0) {
      cy[T.dy[q]] += T.ey[q] * bV[q];
      cyw[T.dy[q]] += T.ey[q] * bW[q];
    }
    if (T.ez[q] > 0) {
      cz[T.dz[q]] += T.ez[q] * bV[q];
      czw[T.dz[q]] += T.ez[q] * bW[q];
    }
  }
  for (int64_t a = 0; a < m; a += 4) {
    const int64_t n = m - a;
    const hv4 xa = hv_load_n(ux + a, n), ya = hv_load_n(uy + a, n), za = hv_load_n(uz + a, n);
    hv4 mono[NM];
    monomials<NA>(xa, ya, za, mono);
    const hv4 zero = hv_splat(0.0);
    hv4 V = zero, Vw = zero, Gx = zero, Gy = zero, Gz = zero, Gxw = zero, Gyw = zero, Gzw = zero;
#if defined(__GNUC__)
#pragma GCC unroll 256
#endif
    for (int q = T.NLOW; q < NM; ++q) {
      V += bV[q] * mono[q];
      Vw += bW[q] * mono[q];
    }
    if (NA >= 1) {
#if defined(__GNUC__)
#pragma GCC unroll 256
#endif
      for (int q = T.NG0; q < NG; ++q) {
        Gx += cx[q] * mono[q];
        Gy += cy[q] * mono[q];
        Gz += cz[q] * mono[q];
        Gxw += cxw[q] * mono[q];
        Gyw += cyw[q] * mono[q];
        Gzw += czw[q] * mono[q];
      }
    }
    const hv4 s = hv_load_n(ss + a, n), f = hv_load_n(ff + a, n), r1 = hv_load_n(ir + a, n);
    const hv4 dEdf = V + s * Vw - f * (sal + s * s * sbe);
    const hv4 gux = f * (Gx + s * Gxw), guy = f * (Gy + s * Gyw), guz = f * (Gz + s * Gzw);
    const hv4 dt = xa * gux + ya * guy + za * guz;
    const hv4 cu = dEdf * hv_load_n(dff + a, n) - dt * r1;
    const hv4 ox = gux * r1 + cu * xa, oy = guy * r1 + cu * ya, oz = guz * r1 + cu * za;
    for (int64_t l = 0; l < 4 && l < n; ++l) {
      gx[a + l] += ox[l];
      gy[a + l] += oy[l];
      gz[a + l] += oz[l];
    }
  }
}

// JVP: for position tangents (vx, vy, vz)[a] = v_j - v_i and vp[a] = u_a . (that),
// adds d A_n and d W_n (Chebyshev orders) to jA[n], jW[n].
// STORED: M and MW are read from the forward's moments row mom instead of being accumulated.
template <int NA, bool STORED = false>
DM_HD void angular_jvp_moments(int64_t m, const double* ux, const double* uy, const double* uz,
                               const double* ir, const double* ff, const double* dff,
                               const double* ss, const double* vx, const double* vy,
                               const double* vz, const double* vp, double* jA, double* jW,
                               const double* mom = nullptr) {
  constexpr const MonoTable<NA>& T = kMono<NA>;
  constexpr int NM = MonoTable<NA>::N;
  const hv4 zero = hv_splat(0.0);
  constexpr int NL = MonoTable<NA>::NLOW;
  hv4 vM[NM], vMW[NM], vdM[NM], vdMW[NM];
  for (int q = NL; q < NM; ++q) vM[q] = vMW[q] = vdM[q] = vdMW[q] = zero;
  hv4 vd0 = zero, vd0w = zero;
  for (int64_t a = 0; a < m; a += 4) {
    const int64_t n = m - a;
    const hv4 xa = hv_load_n(ux + a, n), ya = hv_load_n(uy + a, n), za = hv_load_n(uz + a, n);
    hv4 mono[NM];
    monomials<NA>(xa, ya, za, mono);
    const hv4 p = hv_load_n(vp + a, n), r1 = hv_load_n(ir + a, n);
    const hv4 dux = (hv_load_n(vx + a, n) - p * xa) * r1, duy = (hv_load_n(vy + a, n) - p * ya) * r1,
              duz = (hv_load_n(vz + a, n) - p * za) * r1;
    const hv4 f = hv_load_n(ff + a, n), s = hv_load_n(ss + a, n), df = hv_load_n(dff + a, n) * p;
    const hv4 fs = f * s;
#if defined(__GNUC__)
#pragma GCC unroll 256
#endif
    for (int q = NL; q < NM; ++q) {
      hv4 dmono = zero;  // terms with a zero exponent vanish at compile time
      if (T.ex[q] > 0) dmono += double(T.ex[q]) * mono[T.dx[q]] * dux;
      if (T.ey[q] > 0) dmono += double(T.ey[q]) * mono[T.dy[q]] * duy;
      if (T.ez[q] > 0) dmono += double(T.ez[q]) * mono[T.dz[q]] * duz;
      const hv4 t = df * mono[q] + f * dmono;
      if (!STORED) {
        vM[q] += f * mono[q];
        vMW[q] += fs * mono[q];
      }
      vdM[q] += t;
      vdMW[q] += s * t;
    }
    vd0 += f * df;
    vd0w += f * df * s * s;
  }
  double M[NM], MW[NM], dM[NM], dMW[NM];
  // (the derivatives of the contracted moments are the contracted derivatives: du is tangent)
  for (int q = NL; q < NM; ++q) {
    M[q] = STORED ? mom[3 + q] : hv_sum(vM[q]);
    MW[q] = STORED ? mom[3 + NM + q] : hv_sum(vMW[q]);
    dM[q] = hv_sum(vdM[q]);
    dMW[q] = hv_sum(vdMW[q]);
  }
  if (STORED) {
    for (int q = 0; q < NL; ++q) {
      M[q] = mom[3 + q];
      MW[q] = mom[3 + NM + q];
    }
  } else {
    moments_contract<NA>(M);
    moments_contract<NA>(MW);
  }
  moments_contract<NA>(dM);
  moments_contract<NA>(dMW);
  const double dd0 = hv_sum(vd0), dd0w = hv_sum(vd0w);
  double Q[NA + 1], QW[NA + 1];
  for (int k = 0; k <= NA; ++k) {
    Q[k] = -dd0;
    QW[k] = -dd0w;
  }
  for (int q = 0; q < NM; ++q) {
    Q[T.deg[q]] += T.mult[q] * M[q] * dM[q];
    QW[T.deg[q]] += T.mult[q] * MW[q] * dMW[q];
  }
  double oA[NA + 1], oW[NA + 1];
  monomial_to_chebyshev<NA>(Q, oA);
  monomial_to_chebyshev<NA>(QW, oW);
  for (int n = 0; n <= NA; ++n) {
    jA[n] += oA[n];
    jW[n] += oW[n];
  }
}

#endif  // !__CUDACC__

// ------------------------------------------------------------------------------------------
// host: pair terms vectorised across the pairs of one centre
// ------------------------------------------------------------------------------------------
// On the CPU the per-pair loop runs in three passes over structure-of-arrays fields placed
// after the shared slot fields (the CPU driver allocates kHostSlotFields * cap doubles, cap a
// multiple of kLanes):
//   1. host_pair_pass: one "omp simd" loop over the centre's pairs computes r, u, the species
//      weight, both cutoffs and their derivatives (branch-free), then a scalar pass compacts the
//      entries within rc_a into the angular fields;
//   2. radial sums over blocks of kLanes pairs, the Chebyshev order outermost: the recurrences of
//      kLanes pairs advance together in vector registers (the per-pair form is a dependent chain
//      of 2 N_r multiply-adds and was latency-bound);
//   3. the angular sums (triplet or moment form, unchanged).
// The CUDA kernels keep the per-pair loop (one thread per centre).
#if !defined(__CUDACC__)

constexpr int kLanes = 8;
enum HostField : int {
  hUX = kSlotFields, hUY, hUZ, hR, hIR, hX, hFC, hDFC, hS, hFA, hDFA, hA, hVX, hVY, hVZ,
  hDP, kHostSlotFields
};

DM_HD int64_t host_cap(int64_t cap) { return (cap + kLanes - 1) / kLanes * kLanes; }

// MODE 0: forward, 1: VJP, 2: JVP (v: position tangent).  Returns the number m of angular
// entries written to the slot fields (ux, uy, uz, ff, ss and, for MODE >= 1, ir, dff; for MODE 1
// pid and gx = gy = gz = 0; for MODE 2 vx, vy, vz, vp).  The per-pair fields (hUX..hDP) hold every
// pair of the centre; the radial ones are zero-padded to a multiple of kLanes.
template <int MODE, typename scalar_t>
DM_HD int64_t host_pair_pass(const Problem<scalar_t>& P, int64_t i, const scalar_t* v,
                             double* slot, int64_t cap) {
  const int64_t p0 = P.ptr[i];
  const int64_t np = P.ptr[i + 1] - p0;
  double* DM_RESTRICT UX = slot + hUX * cap;
  double* DM_RESTRICT UY = slot + hUY * cap;
  double* DM_RESTRICT UZ = slot + hUZ * cap;
  double* DM_RESTRICT R = slot + hR * cap;
  double* DM_RESTRICT IR = slot + hIR * cap;
  double* DM_RESTRICT X = slot + hX * cap;
  double* DM_RESTRICT FC = slot + hFC * cap;
  double* DM_RESTRICT DFC = slot + hDFC * cap;
  double* DM_RESTRICT S = slot + hS * cap;
  double* DM_RESTRICT FA = slot + hFA * cap;
  double* DM_RESTRICT DFA = slot + hDFA * cap;
  double* DM_RESTRICT VX = slot + hVX * cap;
  double* DM_RESTRICT VY = slot + hVY * cap;
  double* DM_RESTRICT VZ = slot + hVZ * cap;
  double* DM_RESTRICT VP = slot + hDP * cap;  // the JVP's u . (v_j - v_i)
  const double xi = double(P.pos[3 * i + 0]), yi = double(P.pos[3 * i + 1]),
               zi = double(P.pos[3 * i + 2]);
  const double rcr = P.rc_r, rca = P.rc_a, kr = 2.0 / P.rc_r;
  const double ar = kPi / rcr, aa = kPi / rca;
  const bool w = P.weighted != 0;
  double vix = 0.0, viy = 0.0, viz = 0.0;
  if (MODE == 2) {
    vix = double(v[3 * i + 0]);
    viy = double(v[3 * i + 1]);
    viz = double(v[3 * i + 2]);
  }
  const int64_t* DM_RESTRICT pj = P.pj + p0;
  const scalar_t* DM_RESTRICT sh = P.shift + 3 * p0;
  DM_SIMD()
  for (int64_t q = 0; q < np; ++q) {
    const int64_t j = pj[q];
    const double dx = double(P.pos[3 * j + 0]) - xi + double(sh[3 * q + 0]);
    const double dy = double(P.pos[3 * j + 1]) - yi + double(sh[3 * q + 1]);
    const double dz = double(P.pos[3 * j + 2]) - zi + double(sh[3 * q + 2]);
    const double r = sqrt(dx * dx + dy * dy + dz * dz);
    const double inv = 1.0 / r;
    const double ux = dx * inv, uy = dy * inv, uz = dz * inv;
    UX[q] = ux;
    UY[q] = uy;
    UZ[q] = uz;
    R[q] = r;
    IR[q] = inv;
    const double spin = P.typespin[P.species[j]];  // valid index whatever w (unconditional load)
    S[q] = w ? spin : 0.0;
    if (MODE == 2) {
      const double ex = double(v[3 * j + 0]) - vix;
      const double ey = double(v[3 * j + 1]) - viy;
      const double ez = double(v[3 * j + 2]) - viz;
      VX[q] = ex;
      VY[q] = ey;
      VZ[q] = ez;
      VP[q] = ux * ex + uy * ey + uz * ez;
    }
  }
  if (MODE == 2 && P.strain != nullptr) {  // + r_q eps (row vector times the strain tangent)
    const double* e = P.strain + 9 * P.structure[i];
    const double e00 = e[0], e01 = e[1], e02 = e[2], e10 = e[3], e11 = e[4], e12 = e[5], e20 = e[6],
                 e21 = e[7], e22 = e[8];
    DM_SIMD()
    for (int64_t q = 0; q < np; ++q) {
      const double dx = R[q] * UX[q], dy = R[q] * UY[q], dz = R[q] * UZ[q];
      const double ex = VX[q] + dx * e00 + dy * e10 + dz * e20;
      const double ey = VY[q] + dx * e01 + dy * e11 + dz * e21;
      const double ez = VZ[q] + dx * e02 + dy * e12 + dz * e22;
      VX[q] = ex;
      VY[q] = ey;
      VZ[q] = ez;
      VP[q] = UX[q] * ex + UY[q] * ey + UZ[q] * ez;
    }
  }
  // cutoffs, evaluated at min(r, rc) and masked (arithmetic masks, no branch: vectorises)
  DM_SIMD()
  for (int64_t q = 0; q < np; ++q) {
    const double r = R[q];
    const double mr = r < rcr ? 1.0 : 0.0;
    double cs, sn;
    cutoff_trig_a(r < rcr ? r : rcr, ar, cs, sn);
    X[q] = mr * (kr * r - 1.0) + (1.0 - mr);
    FC[q] = mr * 0.5 * (cs + 1.0);
    if (MODE >= 1) DFC[q] = -mr * 0.5 * ar * sn;  // the forward needs no derivatives (the sine
    const double ma = r < rca ? 1.0 : 0.0;          // polynomials are then dead code)
    cutoff_trig_a(r < rca ? r : rca, aa, cs, sn);
    FA[q] = ma * 0.5 * (cs + 1.0);
    if (MODE >= 1) DFA[q] = -ma * 0.5 * aa * sn;
  }
  for (int64_t q = np; q < host_cap(np); ++q) {  // padding: zero weight, bounded recurrence
    X[q] = FC[q] = S[q] = 0.0;
    if (MODE >= 1) DFC[q] = 0.0;
    if (MODE == 2) VP[q] = 0.0;
  }
  // compaction of the entries within rc_a (in pair order, as the per-pair loop does).  The
  // forward's is branch free (every pair written at position m, which advances only for the
  // kept ones: pairs within and beyond rc_a are mixed, and a branch mispredicts often); the VJP
  // and JVP write three times as many fields, and there the branch measured faster.
  // d2ff (the position Hessian's) is not written: the host passes never run with the Hessian.
  DM_SLOT_POINTERS(slot, cap);
  (void)d2ff;
  int64_t m = 0;
  for (int64_t q = 0; q < np; ++q) {
    if (MODE >= 1 && !(R[q] < rca)) continue;
    ux[m] = UX[q];
    uy[m] = UY[q];
    uz[m] = UZ[q];
    ff[m] = FA[q];
    ss[m] = S[q];
    if (MODE >= 1) {
      ir[m] = IR[q];
      dff[m] = DFA[q];
    }
    if (MODE == 1) pid[m] = double(p0 + q);  // the JVP (without the Hessian) needs no pair index
    if (MODE == 2) {
      vx[m] = VX[q];
      vy[m] = VY[q];
      vz[m] = VZ[q];
      vp[m] = VP[q];
    }
    m += (MODE >= 1 || R[q] < rca) ? 1 : 0;
  }
  if (MODE == 1) {
    for (int64_t k = 0; k < m; ++k) gx[k] = gy[k] = gz[k] = 0.0;
  }
  return m;
}

// out[n] += sum_q T_n(x_q) fc_q, outw[n] += sum_q s_q T_n(x_q) fc_q over the (zero-padded) pairs;
// blocks of kLanes = 2 x 4 pairs, two independent recurrence chains.
template <bool W>
DM_HD void radial_forward_lanes(int64_t np, int nr, const double* X, const double* FC,
                                const double* S, double* out, double* outw) {
  static_assert(kLanes == 8, "two vectors of four lanes");
  hv4 la[2 * (kMaxOrder + 1)], lw[2 * (kMaxOrder + 1)];
  const hv4 zero = hv_splat(0.0), one = hv_splat(1.0);
  for (int q = 0; q < 2 * (nr + 1); ++q) la[q] = lw[q] = zero;
  for (int64_t q0 = 0; q0 < np; q0 += kLanes) {
    const hv4 xa = hv_load(X + q0), xb = hv_load(X + q0 + 4);
    const hv4 fa = hv_load(FC + q0), fb = hv_load(FC + q0 + 4);
    hv4 sa = zero, sb = zero;
    if (W) {
      sa = fa * hv_load(S + q0);
      sb = fb * hv_load(S + q0 + 4);
    }
    la[0] += fa;
    la[1] += fb;
    if (W) {
      lw[0] += sa;
      lw[1] += sb;
    }
    if (nr >= 1) {
      la[2] += xa * fa;
      la[3] += xb * fb;
      if (W) {
        lw[2] += xa * sa;
        lw[3] += xb * sb;
      }
    }
    const hv4 x2a = xa + xa, x2b = xb + xb;
    hv4 ta = xa, tb = xb, tma = one, tmb = one;
    for (int n = 2; n <= nr; ++n) {
      const hv4 na = x2a * ta - tma, nb = x2b * tb - tmb;
      tma = ta;
      tmb = tb;
      ta = na;
      tb = nb;
      la[2 * n] += na * fa;
      la[2 * n + 1] += nb * fb;
      if (W) {
        lw[2 * n] += na * sa;
        lw[2 * n + 1] += nb * sb;
      }
    }
  }
  for (int n = 0; n <= nr; ++n) {
    out[n] += hv_sum(la[2 * n] + la[2 * n + 1]);
    if (W) outw[n] += hv_sum(lw[2 * n] + lw[2 * n + 1]);
  }
}

// Derivative of a Chebyshev series in the Chebyshev basis: sum_n g_n T_n'(x) = sum_m d_m T_m(x)
// (d_{m-1} = d_{m+1} + 2 m g_m, d_0 halved), so that the VJP and JVP need only the T_n
// recurrence, not the second-kind U_n one as well.
DM_HD void chebyshev_derivative(int nr, const double* g, double* d) {
  double d1 = 0.0, d2 = 0.0;  // d_{m}, d_{m+1}
  for (int m = nr; m >= 1; --m) {
    const double dm1 = d2 + 2.0 * m * g[m];  // d_{m-1}
    d[m] = d1;
    d2 = d1;
    d1 = dm1;
  }
  d[0] = 0.5 * d1;
}

// A[q] = d(g . radial)/dr of pair q, g_n = gr[n] + s_q gwr[n]:
//   A = kr fc sum_n g_n T_n'(x) + fc' sum_n g_n T_n(x) = sum_n T_n(x) (kr fc d_n + fc' g_n)
// (d: chebyshev_derivative of g): one three-term recurrence, four multiply-adds per order.
template <bool W>
DM_HD void radial_vjp_lanes(int64_t np, int nr, double kr, const double* X, const double* FC,
                            const double* DFC, const double* S, const double* gr,
                            const double* gwr, double* A) {
  double dr[kMaxOrder + 1], dw[kMaxOrder + 1];
  chebyshev_derivative(nr, gr, dr);
  if (W) chebyshev_derivative(nr, gwr, dw);
  const hv4 one = hv_splat(1.0);
  for (int64_t q0 = 0; q0 < np; q0 += kLanes) {
    hv4 x2[2], t[2], tm[2], sa[2], sw[2], da[2], dd[2];
    for (int h = 0; h < 2; ++h) {
      const hv4 x = hv_load(X + q0 + 4 * h);
      x2[h] = x + x;
      tm[h] = one;  // T_0
      t[h] = x;     // T_1
      sa[h] = gr[0] + (nr >= 1 ? gr[1] * x : hv_splat(0.0));  // sum g_n T_n
      da[h] = dr[0] + (nr >= 1 ? dr[1] * x : hv_splat(0.0));  // sum d_n T_n
      if (W) {
        sw[h] = gwr[0] + (nr >= 1 ? gwr[1] * x : hv_splat(0.0));
        dd[h] = dw[0] + (nr >= 1 ? dw[1] * x : hv_splat(0.0));
      }
    }
    for (int n = 2; n <= nr; ++n) {
      const double g0 = gr[n], d0 = dr[n], g1 = W ? gwr[n] : 0.0, d1 = W ? dw[n] : 0.0;
      for (int h = 0; h < 2; ++h) {
        const hv4 tn = x2[h] * t[h] - tm[h];  // T_n
        tm[h] = t[h];
        t[h] = tn;
        sa[h] += g0 * tn;
        da[h] += d0 * tn;
        if (W) {
          sw[h] += g1 * tn;
          dd[h] += d1 * tn;
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      const int64_t q = q0 + 4 * h;
      const hv4 f = hv_load(FC + q), df = hv_load(DFC + q);
      hv4 a;
      if (W) {
        const hv4 sq = hv_load(S + q);
        a = kr * f * (da[h] + sq * dd[h]) + df * (sa[h] + sq * sw[h]);
      } else {
        a = kr * f * da[h] + df * sa[h];
      }
      for (int l = 0; l < 4; ++l) A[q + l] = a[l];
    }
  }
}

// out[n] += sum_q dp_q d/dr[T_n fc](r_q) = sum_q (kr fc T_n' + fc' T_n) dp_q, outw the same
// weighted by s_q (T_n' = n U_{n-1}, see radial_vjp_lanes).
template <bool W>
DM_HD void radial_jvp_lanes(int64_t np, int nr, double kr, const double* X, const double* FC,
                            const double* DFC, const double* S, const double* DP, double* out,
                            double* outw) {
  hv4 la[2 * (kMaxOrder + 1)], lw[2 * (kMaxOrder + 1)];
  const hv4 zero = hv_splat(0.0), one = hv_splat(1.0);
  for (int q = 0; q < 2 * (nr + 1); ++q) la[q] = lw[q] = zero;
  for (int64_t q0 = 0; q0 < np; q0 += kLanes) {
    hv4 x2[2], kf[2], df[2], s[2], t[2], tm[2], u[2], um[2];
    for (int h = 0; h < 2; ++h) {
      const int64_t q = q0 + 4 * h;
      const hv4 x = hv_load(X + q);
      const hv4 dp = hv_load(DP + q);
      kf[h] = kr * hv_load(FC + q) * dp;  // dp folded into the weights
      df[h] = hv_load(DFC + q) * dp;
      s[h] = W ? hv_load(S + q) : zero;
      x2[h] = x + x;
      tm[h] = one;
      t[h] = x;
      um[h] = zero;
      u[h] = one;
      la[h] += df[h];
      if (W) lw[h] += s[h] * df[h];
      if (nr >= 1) {
        const hv4 c = kf[h] + x * df[h];
        la[2 + h] += c;
        if (W) lw[2 + h] += s[h] * c;
      }
    }
    for (int n = 2; n <= nr; ++n) {
      const double dn = double(n);
      for (int h = 0; h < 2; ++h) {
        const hv4 tn = x2[h] * t[h] - tm[h];
        const hv4 un = x2[h] * u[h] - um[h];  // U_{n-1}
        tm[h] = t[h];
        t[h] = tn;
        um[h] = u[h];
        u[h] = un;
        const hv4 c = (dn * kf[h]) * un + tn * df[h];
        la[2 * n + h] += c;
        if (W) lw[2 * n + h] += s[h] * c;
      }
    }
  }
  for (int n = 0; n <= nr; ++n) {
    out[n] += hv_sum(la[2 * n] + la[2 * n + 1]);
    if (W) outw[n] += hv_sum(lw[2 * n] + lw[2 * n + 1]);
  }
}


// The three per-centre pair passes (the CPU row functions call them from separate non-inlined
// functions, then the centre routine with m_ready = the returned angular count: kept apart so
// that the compiler vectorises each loop nest on its own).
// radial sums of centre i from its pair fields (filled by host_pair_pass of any MODE)
template <typename scalar_t>
DM_HD void host_forward_radial(const Problem<scalar_t>& P, int64_t i, double* slot, int64_t cap,
                               double* acc) {
  const int64_t np = P.ptr[i + 1] - P.ptr[i];
  if (P.weighted)
    radial_forward_lanes<true>(np, P.n_r, slot + hX * cap, slot + hFC * cap, slot + hS * cap, acc,
                               acc + P.off_wr());
  else
    radial_forward_lanes<false>(np, P.n_r, slot + hX * cap, slot + hFC * cap, slot + hS * cap,
                                acc, nullptr);
}

template <typename scalar_t>
DM_HD int64_t host_forward_pairs(const Problem<scalar_t>& P, int64_t i, double* slot, int64_t cap,
                                 double* acc) {
  const int64_t m = host_pair_pass<0>(P, i, static_cast<const scalar_t*>(nullptr), slot, cap);
  host_forward_radial(P, i, slot, cap, acc);
  return m;
}

// The forward's pair terms from the VJP's pair pass, which fills every field the forward reads
// (with the same values) plus those the VJP reads: the force operator runs the forward and the
// VJP of a centre on one pass (chebyshev_cpu.cpp, forward_vjp_impl).  Returns m as the others.
template <typename scalar_t>
DM_HD int64_t host_forward_pairs_for_vjp(const Problem<scalar_t>& P, int64_t i, double* slot,
                                         int64_t cap, double* acc) {
  const int64_t m = host_pair_pass<1>(P, i, static_cast<const scalar_t*>(nullptr), slot, cap);
  host_forward_radial(P, i, slot, cap, acc);
  return m;
}

// Writes gp[3(p - p_base)..] = radial part of d(g.G_i)/d r_p for every pair p of i, from the
// pair fields of the VJP's pair pass (host_pair_pass<1>).
template <typename scalar_t, typename gscalar_t>
DM_HD void host_vjp_radial(const Problem<scalar_t>& P, int64_t i, const gscalar_t* g_row,
                           double* slot, int64_t cap, double* gp, int64_t p_base) {
  const int nr = P.n_r;
  const bool w = P.weighted != 0;
  double gr[kMaxOrder + 1], gwr[kMaxOrder + 1];
  for (int n = 0; n <= nr; ++n) {
    gr[n] = double(g_row[n]);
    gwr[n] = w ? double(g_row[P.off_wr() + n]) : 0.0;
  }
  const int64_t np = P.ptr[i + 1] - P.ptr[i];
  const double kr = 2.0 / P.rc_r;
  double* DM_RESTRICT A = slot + hA * cap;
  if (w)
    radial_vjp_lanes<true>(np, nr, kr, slot + hX * cap, slot + hFC * cap, slot + hDFC * cap,
                           slot + hS * cap, gr, gwr, A);
  else
    radial_vjp_lanes<false>(np, nr, kr, slot + hX * cap, slot + hFC * cap, slot + hDFC * cap,
                            slot + hS * cap, gr, gwr, A);
  const double* DM_RESTRICT UX = slot + hUX * cap;
  const double* DM_RESTRICT UY = slot + hUY * cap;
  const double* DM_RESTRICT UZ = slot + hUZ * cap;
  double* DM_RESTRICT out = gp + 3 * (P.ptr[i] - p_base);
  for (int64_t q = 0; q < np; ++q) {
    out[3 * q + 0] = A[q] * UX[q];
    out[3 * q + 1] = A[q] * UY[q];
    out[3 * q + 2] = A[q] * UZ[q];
  }
}

template <typename scalar_t, typename gscalar_t>
DM_HD int64_t host_vjp_pairs(const Problem<scalar_t>& P, int64_t i, const gscalar_t* g_row,
                             double* slot, int64_t cap, double* gp, int64_t p_base) {
  const int64_t m = host_pair_pass<1>(P, i, static_cast<const scalar_t*>(nullptr), slot, cap);
  host_vjp_radial(P, i, g_row, slot, cap, gp, p_base);
  return m;
}

// Adds the radial part of J v to jv (zeroed by the caller).
template <typename scalar_t>
DM_HD int64_t host_jvp_pairs(const Problem<scalar_t>& P, int64_t i, const scalar_t* v,
                             double* slot, int64_t cap, double* jv) {
  const int64_t m = host_pair_pass<2>(P, i, v, slot, cap);
  const int64_t np = P.ptr[i + 1] - P.ptr[i];
  const double kr = 2.0 / P.rc_r;
  if (P.weighted)
    radial_jvp_lanes<true>(np, P.n_r, kr, slot + hX * cap, slot + hFC * cap, slot + hDFC * cap,
                           slot + hS * cap, slot + hDP * cap, jv, jv + P.off_wr());
  else
    radial_jvp_lanes<false>(np, P.n_r, kr, slot + hX * cap, slot + hFC * cap, slot + hDFC * cap,
                            slot + hS * cap, slot + hDP * cap, jv, nullptr);
  return m;
}

// w[9] = sum over the np pairs q of a centre of r_q (x) gp[q] (row-major 3x3), r_q = R u from the
// per-pair fields of the VJP's pair pass (host_pair_pass<1>, still in the centre's slot) and gp
// the centre's pair gradients d(g.G_i)/d r_q: its share of the virial dE/d(strain), formed from
// the pair gradients without storing them.
DM_HD void host_centre_virial(int64_t np, const double* slot, int64_t cap, const double* gp, double* w) {
  const double* DM_RESTRICT UX = slot + hUX * cap;
  const double* DM_RESTRICT UY = slot + hUY * cap;
  const double* DM_RESTRICT UZ = slot + hUZ * cap;
  const double* DM_RESTRICT R = slot + hR * cap;
  double w0 = 0, w1 = 0, w2 = 0, w3 = 0, w4 = 0, w5 = 0, w6 = 0, w7 = 0, w8 = 0;
  DM_SIMD(reduction(+ : w0, w1, w2, w3, w4, w5, w6, w7, w8))
  for (int64_t q = 0; q < np; ++q) {
    const double dx = R[q] * UX[q], dy = R[q] * UY[q], dz = R[q] * UZ[q];
    const double gx = gp[3 * q + 0], gy = gp[3 * q + 1], gz = gp[3 * q + 2];
    w0 += dx * gx;
    w1 += dx * gy;
    w2 += dx * gz;
    w3 += dy * gx;
    w4 += dy * gy;
    w5 += dy * gz;
    w6 += dz * gx;
    w7 += dz * gy;
    w8 += dz * gz;
  }
  w[0] = w0; w[1] = w1; w[2] = w2; w[3] = w3; w[4] = w4; w[5] = w5; w[6] = w6; w[7] = w7; w[8] = w8;
}

#endif  // !__CUDACC__

// ------------------------------------------------------------------------------------------
// forward
// ------------------------------------------------------------------------------------------

// acc: [dim] doubles, zeroed by the caller.  slot: kSlotFields * cap doubles, cap >= number of
// pairs of centre i.
template <int NAC, typename scalar_t>
DM_HD void centre_forward(const Problem<scalar_t>& P, int64_t i, double* slot, int64_t cap,
                          double* acc, int64_t m_ready = -1, double* mom = nullptr) {
  constexpr int NA1 = NAC >= 0 ? NAC + 1 : kMaxOrder + 1;
  const int nr = P.n_r;
  const int na = angular_order<NAC>(P);
  const bool w = P.weighted != 0;
  const int oa = P.off_a(), owr = P.off_wr(), owa = P.off_wa();
  double* DM_RESTRICT ux = slot + fUX * cap;
  double* DM_RESTRICT uy = slot + fUY * cap;
  double* DM_RESTRICT uz = slot + fUZ * cap;
  double* DM_RESTRICT ff = slot + fF * cap;
  double* DM_RESTRICT ss = slot + fS * cap;
  int64_t m = m_ready >= 0 ? m_ready : 0;  // m_ready >= 0: pair terms done by the caller
  for (int64_t p = P.ptr[i]; m_ready < 0 && p < P.ptr[i + 1]; ++p) {
    double d[3];
    const double r = pair_vector(P, i, p, d);
    const double s = neighbour_spin(P, p);
    if (r < P.rc_r) {
      const double fc = cutoff_value(r, P.rc_r);
      const double x = 2.0 * r / P.rc_r - 1.0;
      double tm = 1.0, t = x;
      acc[0] += fc;
      if (w) acc[owr] += s * fc;
      if (nr >= 1) {
        acc[1] += x * fc;
        if (w) acc[owr + 1] += s * x * fc;
      }
      for (int n = 2; n <= nr; ++n) {
        const double tn = 2.0 * x * t - tm;
        tm = t;
        t = tn;
        acc[n] += tn * fc;
        if (w) acc[owr + n] += s * tn * fc;
      }
    }
    if (r < P.rc_a) {
      const double inv = 1.0 / r;
      ux[m] = d[0] * inv;
      uy[m] = d[1] * inv;
      uz[m] = d[2] * inv;
      ff[m] = cutoff_value(r, P.rc_a);
      ss[m] = s;
      ++m;
    }
  }
  double A[NA1];
  double W[NA1];
  for (int n = 0; n <= na; ++n) A[n] = W[n] = 0.0;
  bool done = false;
#if !defined(__CUDACC__)
  if (mom != nullptr) mom[0] = 0.0;  // no moments row (triplet form)
  if constexpr (NAC >= 0) {
    if (m >= P.moments_min) {
      angular_forward_moments<NAC>(m, ux, uy, uz, ff, ss, A, W, mom);
      done = true;
    }
  }
#endif
  for (int64_t a = 0; !done && a + 1 < m; ++a) {
    const double xa = ux[a], ya = uy[a], za = uz[a], fa = ff[a], sa = ss[a];
    if (NAC >= 0) {
      // sum over b of T_n(c) f_b and T_n(c) f_b s_b, in named scalars (SIMD reductions)
      DM_DECLARE_ACC9(L);
      DM_DECLARE_ACC9(M);
      DM_SIMD(reduction(+ : DM_LIST9(L), DM_LIST9(M)))
      for (int64_t b = a + 1; b < m; ++b) {
        const double c = xa * ux[b] + ya * uy[b] + za * uz[b];
        const double wt = ff[b];
        const double wsb = wt * ss[b];
        double t[NA1 > 2 ? NA1 : 2];
        t[0] = 1.0;
        t[1] = c;
        for (int n = 2; n < NA1; ++n) t[n] = 2.0 * c * t[n - 1] - t[n - 2];
#define DM_ACC(k)                      \
  if constexpr (NA1 > k) {             \
    L##k += t[k] * wt;                 \
    M##k += t[k] * wsb;                \
  }
        DM_APPLY9(DM_ACC)
#undef DM_ACC
      }
      const double Ls[9] = {DM_LIST9(L)};
      const double Ms[9] = {DM_LIST9(M)};
      for (int n = 0; n < NA1 && n < 9; ++n) {
        A[n] += fa * Ls[n];
        W[n] += fa * sa * Ms[n];
      }
    } else {
      double La[NA1];  // sum over b of T_n(c) f_b (and weighted by s_b)
      double Lw[NA1];
      for (int n = 0; n <= na; ++n) La[n] = Lw[n] = 0.0;
      for (int64_t b = a + 1; b < m; ++b) {
        const double c = xa * ux[b] + ya * uy[b] + za * uz[b];
        const double wt = ff[b];
        const double wsb = wt * ss[b];
        double tm = 1.0, t = c;
        La[0] += wt;
        Lw[0] += wsb;
        if (na >= 1) {
          La[1] += c * wt;
          Lw[1] += c * wsb;
        }
        for (int n = 2; n <= na; ++n) {
          const double tn = 2.0 * c * t - tm;
          tm = t;
          t = tn;
          La[n] += tn * wt;
          Lw[n] += tn * wsb;
        }
      }
      for (int n = 0; n <= na; ++n) {
        A[n] += fa * La[n];
        W[n] += fa * sa * Lw[n];
      }
    }
  }
  for (int n = 0; n <= na; ++n) {
    acc[oa + n] += A[n];
    if (w) acc[owa + n] += W[n];
  }
}

// ------------------------------------------------------------------------------------------
// backward (vector-Jacobian product)
// ------------------------------------------------------------------------------------------

// g_row: dE/dG_i [dim].  Writes gp[3(p - p_base)..+2] = d(g.G_i)/d r_p for every pair p of i
// (zero for pairs beyond both cutoffs; p_base lets the caller pass a buffer that holds only a
// chunk of the pairs) and dRi[0..2] = -sum_p gp[p] (the centre's own term).
template <int NAC, typename scalar_t, typename gscalar_t>
DM_HD void centre_vjp(const Problem<scalar_t>& P, int64_t i, const gscalar_t* g_row,
                      double* slot, int64_t cap, double* gp, int64_t p_base,
                      double* dRi, int64_t m_ready = -1, const double* mom = nullptr) {
  constexpr int NA1 = NAC >= 0 ? NAC + 1 : kMaxOrder + 1;
  const int nr = P.n_r;
  const int na = angular_order<NAC>(P);
  const bool w = P.weighted != 0;
  const int oa = P.off_a(), owr = P.off_wr(), owa = P.off_wa();
  double gr[kMaxOrder + 1], gwr[kMaxOrder + 1], ga[NA1], gwa[NA1], al[NA1], be[NA1];
  for (int n = 0; n <= nr; ++n) {
    gr[n] = double(g_row[n]);
    gwr[n] = w ? double(g_row[owr + n]) : 0.0;
  }
  for (int n = 0; n <= na; ++n) {
    ga[n] = double(g_row[oa + n]);
    gwa[n] = w ? double(g_row[owa + n]) : 0.0;
  }
  angular_coefficients<NAC>(na, ga, gwa, al, be);
  double* DM_RESTRICT ux = slot + fUX * cap;
  double* DM_RESTRICT uy = slot + fUY * cap;
  double* DM_RESTRICT uz = slot + fUZ * cap;
  double* DM_RESTRICT ir = slot + fIR * cap;
  double* DM_RESTRICT ff = slot + fF * cap;
  double* DM_RESTRICT dff = slot + fDF * cap;
  double* DM_RESTRICT ss = slot + fS * cap;
  double* DM_RESTRICT pid = slot + fPIDX * cap;
  double* DM_RESTRICT gx = slot + fGX * cap;
  double* DM_RESTRICT gy = slot + fGY * cap;
  double* DM_RESTRICT gz = slot + fGZ * cap;
  int64_t m = m_ready >= 0 ? m_ready : 0;  // m_ready >= 0: pair terms done by the caller
  const double kr = 2.0 / P.rc_r;
  for (int64_t p = P.ptr[i]; m_ready < 0 && p < P.ptr[i + 1]; ++p) {
    double d[3];
    const double r = pair_vector(P, i, p, d);
    const double s = neighbour_spin(P, p);
    const double inv = 1.0 / r;
    double a = 0.0;  // d(g.radial)/dr
    if (r < P.rc_r) {
      const Cutoff c = cutoff_fn(r, P.rc_r);
      const double x = kr * r - 1.0;
      double tm = 1.0, t = x, dtm = 0.0, dt = 1.0;
      a += (gr[0] + s * gwr[0]) * c.df;
      if (nr >= 1) a += (gr[1] + s * gwr[1]) * (kr * c.f + x * c.df);
      for (int n = 2; n <= nr; ++n) {
        const double tn = 2.0 * x * t - tm;
        const double dtn = 2.0 * t + 2.0 * x * dt - dtm;
        tm = t;
        t = tn;
        dtm = dt;
        dt = dtn;
        a += (gr[n] + s * gwr[n]) * (kr * dtn * c.f + tn * c.df);
      }
    }
    gp[3 * (p - p_base) + 0] = a * d[0] * inv;
    gp[3 * (p - p_base) + 1] = a * d[1] * inv;
    gp[3 * (p - p_base) + 2] = a * d[2] * inv;
    if (r < P.rc_a) {
      const Cutoff c = cutoff_fn(r, P.rc_a);
      ux[m] = d[0] * inv;
      uy[m] = d[1] * inv;
      uz[m] = d[2] * inv;
      ir[m] = inv;
      ff[m] = c.f;
      dff[m] = c.df;
      ss[m] = s;
      pid[m] = double(p);
      gx[m] = gy[m] = gz[m] = 0.0;
      ++m;
    }
  }
  // Angular: for a < b, with S = sum_n w_n T_n(c), S1 = dS/dc, A1 = S1 f_a f_b,
  //   grad_a = A1 (u_b - c u_a)/r_a + S f_a' f_b u_a,  grad_b = A1 (u_a - c u_b)/r_b + S f_a f_b' u_b.
  // grad_a is accumulated as ira * sum_b A1 u_b + (dfa sum_b S f_b - ira sum_b A1 c) u_a.
  bool done = false;
#if !defined(__CUDACC__)
  if constexpr (NAC >= 0) {
    // mom: the forward's moments row (flag mom[0] = 1 when the forward used the moment form)
    if (mom != nullptr && mom[0] == 1.0) {
      angular_vjp_moments<NAC>(m, ux, uy, uz, ir, ff, dff, ss, al, be, gx, gy, gz, mom);
      done = true;
    } else if (m >= P.moments_min) {
      angular_vjp_moments<NAC>(m, ux, uy, uz, ir, ff, dff, ss, al, be, gx, gy, gz);
      done = true;
    }
  }
#endif
  for (int64_t a = 0; !done && a + 1 < m; ++a) {
    const double xa = ux[a], ya = uy[a], za = uz[a], fa = ff[a], sa = ss[a];
    const double ira = ir[a];
    double vx = 0.0, vy = 0.0, vz = 0.0, ks = 0.0, kc = 0.0;
    DM_SIMD(reduction(+ : vx, vy, vz, ks, kc))
    for (int64_t b = a + 1; b < m; ++b) {
      const double xb = ux[b], yb = uy[b], zb = uz[b], fb = ff[b];
      const double c = xa * xb + ya * yb + za * zb;
      double S, S1, S2;
      angular_poly<NAC, 1>(c, sa * ss[b], na, al, be, S, S1, S2);
      const double A1 = S1 * fa * fb;
      vx += A1 * xb;
      vy += A1 * yb;
      vz += A1 * zb;
      ks += S * fb;
      kc += A1 * c;
      const double cu = S * fa * dff[b] - A1 * c * ir[b];
      const double cv = A1 * ir[b];
      gx[b] += cu * xb + cv * xa;
      gy[b] += cu * yb + cv * ya;
      gz[b] += cu * zb + cv * za;
    }
    const double cua = dff[a] * ks - ira * kc;
    gx[a] += ira * vx + cua * xa;
    gy[a] += ira * vy + cua * ya;
    gz[a] += ira * vz + cua * za;
  }
  for (int64_t a = 0; a < m; ++a) {
    const int64_t p = int64_t(pid[a]);
    gp[3 * (p - p_base) + 0] += gx[a];
    gp[3 * (p - p_base) + 1] += gy[a];
    gp[3 * (p - p_base) + 2] += gz[a];
  }
  double sx = 0.0, sy = 0.0, sz = 0.0;
  for (int64_t p = P.ptr[i]; p < P.ptr[i + 1]; ++p) {
    sx += gp[3 * (p - p_base) + 0];
    sy += gp[3 * (p - p_base) + 1];
    sz += gp[3 * (p - p_base) + 2];
  }
  dRi[0] = -sx;
  dRi[1] = -sy;
  dRi[2] = -sz;
}

// ------------------------------------------------------------------------------------------
// double backward: Jacobian-vector product and (optional) Hessian-vector product
// ------------------------------------------------------------------------------------------

// v: [N, 3] position tangent (the gradient flowing into the dE/dR output).
// JVP: jv [dim] (zeroed by the caller) += dG_i/dR . v.
// HVP: hp[3(p - p_base)..] = sum_q d^2(g.G_i)/(dr_p dr_q) . dr_q for every pair p of i,
//      dHi = -sum_p hp[p];
//      the caller scatters hv_j += hp[p].  g_row is only read when HVP is set.
//
// Angular JVP for a < b:  d/dv [T_n(c) f_a f_b] = T_n'(c) dc f_a f_b + T_n(c) dw with
//   dc = (u_b.dr_a - c dp_a)/r_a + (u_a.dr_b - c dp_b)/r_b, dp = u.dr, dw = d(f_a f_b).
// For NAC >= 0 the sums are accumulated in the monomial basis, Q_k = sum (c^k dw + k c^(k-1) X)
// with X = dc f_a f_b, and converted to Chebyshev once per centre.
// Angular HVP: derivative along v of grad_a = S1 f_a f_b e_a + S f_a' f_b u_a (e_a = (u_b - c u_a)/r_a):
//   h_a = (S2 dc fab + S1 dw) e_a + S1 fab de_a + (S1 dc f_a' f_b + S (f_a'' dp_a f_b + f_a' f_b' dp_b)) u_a
//         + S f_a' f_b du_a,
//   du_a = (dr_a - dp_a u_a)/r_a, de_a = (du_b - dc u_a - c du_a - e_a dp_a)/r_a,
// written below in the basis {u_a, u_b, dr_a, dr_b}.
template <int NAC, bool JVP, bool HVP, typename scalar_t, typename gscalar_t>
DM_HD void centre_jvp_hvp(const Problem<scalar_t>& P, int64_t i, const gscalar_t* g_row,
                          const scalar_t* v, double* slot, int64_t cap, double* jv, double* hp,
                          int64_t p_base, double* dHi, int64_t m_ready = -1,
                          const double* mom = nullptr) {
  constexpr int NA1 = NAC >= 0 ? NAC + 1 : kMaxOrder + 1;
  const int nr = P.n_r;
  const int na = angular_order<NAC>(P);
  const bool w = P.weighted != 0;
  const int oa = P.off_a(), owr = P.off_wr(), owa = P.off_wa();
  double gr[kMaxOrder + 1], gwr[kMaxOrder + 1], ga[NA1], gwa[NA1], al[NA1], be[NA1];
  if (HVP) {
    for (int n = 0; n <= nr; ++n) {
      gr[n] = double(g_row[n]);
      gwr[n] = w ? double(g_row[owr + n]) : 0.0;
    }
    for (int n = 0; n <= na; ++n) {
      ga[n] = double(g_row[oa + n]);
      gwa[n] = w ? double(g_row[owa + n]) : 0.0;
    }
    angular_coefficients<NAC>(na, ga, gwa, al, be);
  }
  DM_SLOT_POINTERS(slot, cap);
  const double kr = 2.0 / P.rc_r;
  const double vix = double(v[3 * i + 0]), viy = double(v[3 * i + 1]), viz = double(v[3 * i + 2]);
  int64_t m = m_ready >= 0 ? m_ready : 0;  // m_ready >= 0: pair terms done by the caller
  for (int64_t p = P.ptr[i]; m_ready < 0 && p < P.ptr[i + 1]; ++p) {
    double d[3];
    const double r = pair_vector(P, i, p, d);
    const double s = neighbour_spin(P, p);
    const double inv = 1.0 / r;
    const double u0 = d[0] * inv, u1 = d[1] * inv, u2 = d[2] * inv;
    const int64_t j = P.pj[p];
    const double dx = double(v[3 * j + 0]) - vix;
    const double dy = double(v[3 * j + 1]) - viy;
    const double dz = double(v[3 * j + 2]) - viz;
    const double dp = u0 * dx + u1 * dy + u2 * dz;
    double a = 0.0, a2 = 0.0;  // d(g.radial)/dr and d2(g.radial)/dr2
    if (r < P.rc_r) {
      const Cutoff c = cutoff_fn(r, P.rc_r);
      const double x = kr * r - 1.0;
      double tm = 1.0, t = x, dtm = 0.0, dt = 1.0, d2tm = 0.0, d2t = 0.0;
      for (int n = 0; n <= nr; ++n) {
        double tn, dtn, d2tn;
        if (n == 0) {
          tn = 1.0; dtn = 0.0; d2tn = 0.0;
        } else if (n == 1) {
          tn = x; dtn = 1.0; d2tn = 0.0;
        } else {
          tn = 2.0 * x * t - tm;
          dtn = 2.0 * t + 2.0 * x * dt - dtm;
          d2tn = 4.0 * dt + 2.0 * x * d2t - d2tm;
          tm = t; t = tn;
          dtm = dt; dt = dtn;
          d2tm = d2t; d2t = d2tn;
        }
        const double f1 = kr * dtn * c.f + tn * c.df;  // d/dr [T_n(x) fc]
        if (JVP) {
          jv[n] += f1 * dp;
          if (w) jv[owr + n] += s * f1 * dp;
        }
        if (HVP) {
          const double wn = gr[n] + s * gwr[n];
          a += wn * f1;
          a2 += wn * (kr * kr * d2tn * c.f + 2.0 * kr * dtn * c.df + tn * c.d2f);
        }
      }
    }
    if (HVP) {
      // d(a u) = a' dp u + a (dr - dp u) / r
      const double cu = a2 * dp - a * dp * inv;
      const double cd = a * inv;
      hp[3 * (p - p_base) + 0] = cu * u0 + cd * dx;
      hp[3 * (p - p_base) + 1] = cu * u1 + cd * dy;
      hp[3 * (p - p_base) + 2] = cu * u2 + cd * dz;
    }
    if (r < P.rc_a) {
      const Cutoff c = cutoff_fn(r, P.rc_a);
      ux[m] = u0;
      uy[m] = u1;
      uz[m] = u2;
      ir[m] = inv;
      ff[m] = c.f;
      dff[m] = c.df;
      d2ff[m] = c.d2f;
      ss[m] = s;
      pid[m] = double(p);
      vx[m] = dx;
      vy[m] = dy;
      vz[m] = dz;
      vp[m] = dp;
      gx[m] = gy[m] = gz[m] = 0.0;
      ++m;
    }
  }
  double QA[NA1], QW[NA1];  // JVP sums (monomial moments for NAC >= 0, Chebyshev otherwise)
  if (JVP) {
    for (int n = 0; n <= na; ++n) QA[n] = QW[n] = 0.0;
  }
  bool done = false;
#if !defined(__CUDACC__)
  if constexpr (NAC >= 0 && JVP && !HVP) {
    const bool stored = mom != nullptr && mom[0] == 1.0;  // the forward's moments row
    if (stored || m >= P.moments_min) {
      double jA[NA1], jW[NA1];
      for (int n = 0; n <= na; ++n) jA[n] = jW[n] = 0.0;
      if (stored)
        angular_jvp_moments<NAC, true>(m, ux, uy, uz, ir, ff, dff, ss, vx, vy, vz, vp, jA, jW,
                                       mom);
      else
        angular_jvp_moments<NAC>(m, ux, uy, uz, ir, ff, dff, ss, vx, vy, vz, vp, jA, jW);
      for (int n = 0; n <= na; ++n) {
        jv[oa + n] += jA[n];
        if (w) jv[owa + n] += jW[n];
      }
      done = true;
    }
  }
#endif
  for (int64_t a = 0; !done && a + 1 < m; ++a) {
    const double xa = ux[a], ya = uy[a], za = uz[a];
    const double ira = ir[a];
    const double fa = ff[a], dfa = dff[a], d2fa = d2ff[a], sa = ss[a];
    const double dxa = vx[a], dya = vy[a], dza = vz[a], dpa = vp[a];
    const double dfa_dpa = dfa * dpa;
    double hx = 0.0, hy = 0.0, hz = 0.0;  // HVP: sum_b of the u_b and dr_b parts of h_a
    double hua = 0.0, hda = 0.0;          // HVP: coefficients of u_a and dr_a in h_a
    // JVP sums over b: named scalars (specialised orders) or arrays (generic order)
    DM_DECLARE_ACC9(L);
    DM_DECLARE_ACC9(M);
    double La[NA1], Lw[NA1];
    if (JVP && NAC < 0) {
      for (int n = 0; n <= na; ++n) La[n] = Lw[n] = 0.0;
    }
    DM_SIMD(reduction(+ : DM_LIST9(L), DM_LIST9(M), hx, hy, hz, hua, hda))
    for (int64_t b = a + 1; b < m; ++b) {
      const double xb = ux[b], yb = uy[b], zb = uz[b];
      const double irb = ir[b];
      const double fb = ff[b], dfb = dff[b];
      const double dxb = vx[b], dyb = vy[b], dzb = vz[b], dpb = vp[b];
      const double c = xa * xb + ya * yb + za * zb;
      const double qab = xb * dxa + yb * dya + zb * dza;  // u_b . dr_a
      const double qba = xa * dxb + ya * dyb + za * dzb;  // u_a . dr_b
      const double dc = (qab - c * dpa) * ira + (qba - c * dpb) * irb;
      const double fab = fa * fb;
      const double dw = dfa_dpa * fb + fa * dfb * dpb;  // d(f_a f_b)
      const double sb = ss[b];
      if (JVP) {
        if (NAC >= 0) {
          // monomial moments Q_k = c^k dw + k c^(k-1) X
          const double X = dc * fab;
          double q[NA1];
          q[0] = dw;
          double pk = 1.0;
          for (int k = 1; k < NA1; ++k) {
            q[k] = pk * (c * dw + double(k) * X);
            pk *= c;
          }
#define DM_ACC(k)                      \
  if constexpr (NA1 > k) {             \
    L##k += q[k];                      \
    M##k += sb * q[k];                 \
  }
          DM_APPLY9(DM_ACC)
#undef DM_ACC
        } else {
          double tm = 1.0, t = c, dtm = 0.0, dt = 1.0;
          for (int n = 0; n <= na; ++n) {
            double tn, dtn;
            if (n == 0) {
              tn = 1.0; dtn = 0.0;
            } else if (n == 1) {
              tn = c; dtn = 1.0;
            } else {
              tn = 2.0 * c * t - tm;
              dtn = 2.0 * t + 2.0 * c * dt - dtm;
              tm = t; t = tn;
              dtm = dt; dt = dtn;
            }
            const double jn = dtn * dc * fab + tn * dw;
            La[n] += jn;
            Lw[n] += sb * jn;
          }
        }
      }
      if (HVP) {
        double S, S1, S2;
        angular_poly<NAC, 2>(c, sa * sb, na, al, be, S, S1, S2);
        const double kA = S2 * dc * fab + S1 * dw;  // times e
        const double kB = S1 * fab;                 // times de
        const double kCa = S1 * dc * dfa * fb + S * (d2fa * dpa * fb + dfa * dfb * dpb);
        const double kDa = S * dfa * fb;
        const double kCb = S1 * dc * fa * dfb + S * (dfa_dpa * dfb + fa * d2ff[b] * dpb);
        const double kDb = S * fa * dfb;
        const double iab = ira * irb;
        // h_a in the basis {u_a, u_b, dr_a, dr_b}
        const double a_ub = kA * ira - kB * (iab * dpb + ira * ira * dpa);
        const double a_ua = -kA * c * ira + kB * (2.0 * c * ira * ira * dpa - ira * dc) + kCa - kDa * ira * dpa;
        const double a_da = kDa * ira - kB * c * ira * ira;
        const double a_db = kB * iab;
        // h_b: the same with a and b exchanged
        const double b_ua = kA * irb - kB * (iab * dpa + irb * irb * dpb);
        const double b_ub = -kA * c * irb + kB * (2.0 * c * irb * irb * dpb - irb * dc) + kCb - kDb * irb * dpb;
        const double b_db = kDb * irb - kB * c * irb * irb;
        const double b_da = kB * iab;
        hua += a_ua;
        hda += a_da;
        hx += a_ub * xb + a_db * dxb;
        hy += a_ub * yb + a_db * dyb;
        hz += a_ub * zb + a_db * dzb;
        gx[b] += b_ub * xb + b_db * dxb + b_ua * xa + b_da * dxa;
        gy[b] += b_ub * yb + b_db * dyb + b_ua * ya + b_da * dya;
        gz[b] += b_ub * zb + b_db * dzb + b_ua * za + b_da * dza;
      }
    }
    if (JVP) {
      if (NAC >= 0) {
        const double Ls[9] = {DM_LIST9(L)};
        const double Ms[9] = {DM_LIST9(M)};
        for (int n = 0; n < NA1 && n < 9; ++n) {
          QA[n] += Ls[n];
          QW[n] += sa * Ms[n];
        }
      } else {
        for (int n = 0; n <= na; ++n) {
          QA[n] += La[n];
          QW[n] += sa * Lw[n];
        }
      }
    }
    if (HVP) {
      gx[a] += hx + hua * xa + hda * dxa;
      gy[a] += hy + hua * ya + hda * dya;
      gz[a] += hz + hua * za + hda * dza;
    }
  }
  if (JVP) {
    if (NAC >= 0) {
      double tc[(kMaxSpecialised + 1) * (kMaxSpecialised + 1)];
      cheb_monomial(na, tc);
      for (int n = 0; n <= na; ++n) {
        double x = 0.0, y = 0.0;
        for (int k = 0; k <= n; ++k) {
          x += tc[n * (na + 1) + k] * QA[k];
          y += tc[n * (na + 1) + k] * QW[k];
        }
        jv[oa + n] += x;
        if (w) jv[owa + n] += y;
      }
    } else {
      for (int n = 0; n <= na; ++n) {
        jv[oa + n] += QA[n];
        if (w) jv[owa + n] += QW[n];
      }
    }
  }
  if (HVP) {
    for (int64_t a = 0; a < m; ++a) {
      const int64_t p = int64_t(pid[a]);
      hp[3 * (p - p_base) + 0] += gx[a];
      hp[3 * (p - p_base) + 1] += gy[a];
      hp[3 * (p - p_base) + 2] += gz[a];
    }
    double sx = 0.0, sy = 0.0, sz = 0.0;
    for (int64_t p = P.ptr[i]; p < P.ptr[i + 1]; ++p) {
      sx += hp[3 * (p - p_base) + 0];
      sy += hp[3 * (p - p_base) + 1];
      sz += hp[3 * (p - p_base) + 2];
    }
    dHi[0] = -sx;
    dHi[1] = -sy;
    dHi[2] = -sz;
  }
}

// Dispatch on the angular order: orders 0..8 get compile-time specialisations.
#define DISTMLIP_DISPATCH_NA(na_value, NAC, ...)          \
  switch (na_value) {                                     \
    case 0: { constexpr int NAC = 0; __VA_ARGS__; } break; \
    case 1: { constexpr int NAC = 1; __VA_ARGS__; } break; \
    case 2: { constexpr int NAC = 2; __VA_ARGS__; } break; \
    case 3: { constexpr int NAC = 3; __VA_ARGS__; } break; \
    case 4: { constexpr int NAC = 4; __VA_ARGS__; } break; \
    case 5: { constexpr int NAC = 5; __VA_ARGS__; } break; \
    case 6: { constexpr int NAC = 6; __VA_ARGS__; } break; \
    case 7: { constexpr int NAC = 7; __VA_ARGS__; } break; \
    case 8: { constexpr int NAC = 8; __VA_ARGS__; } break; \
    default: { constexpr int NAC = -1; __VA_ARGS__; } break; \
  }

}  // namespace cheb
}  // namespace distmlip

// ------------------------------------------------------------------------------------------
// CUDA launchers (defined in chebyshev_cuda.cu, called by chebyshev_cuda_glue.cpp).  All take
// device pointers and a stream; none synchronises the host.  Return the launch status.
// ------------------------------------------------------------------------------------------
#if defined(__CUDACC__) || defined(DISTMLIP_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace distmlip {
namespace cheb {
namespace cuda {

// scratch: kSlotFields * n_pairs doubles.  G: [N, dim] in scalar_t.
template <typename scalar_t>
cudaError_t launch_forward(const Problem<scalar_t>& P, double* scratch, scalar_t* G,
                           cudaStream_t stream);

// gp: [P, 3] doubles (scratch); dR: [N, 3] doubles, written (no need to zero).
template <typename scalar_t>
cudaError_t launch_vjp(const Problem<scalar_t>& P, const scalar_t* g, double* scratch, double* gp,
                       double* dR, cudaStream_t stream);

// jv: [N, dim] scalar_t (written when need_jvp); hv: [N, 3] doubles (written when need_hvp);
// hp: [P, 3] doubles scratch (used when need_hvp).
template <typename scalar_t>
cudaError_t launch_jvp_hvp(const Problem<scalar_t>& P, const scalar_t* g, const scalar_t* v,
                           double* scratch, scalar_t* jv, double* hp, double* hv, bool need_jvp,
                           bool need_hvp, cudaStream_t stream);

}  // namespace cuda
}  // namespace cheb
}  // namespace distmlip
#endif
