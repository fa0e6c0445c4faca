// Per-centre row functions of the CPU descriptor kernels (forward, VJP, JVP/HVP), one copy per
// instruction set (generic x86-64 / any CPU, and AVX2 + FMA: the routines of chebyshev.h are
// always_inline, so each copy is generated for its instruction set) and per scalar type.
//
// Defined by DISTMLIP_DEFINE_ROWS and instantiated in four translation units
// (chebyshev_rows_{generic,avx2}_{f64,f32}.cpp): the 200 inlined routine bodies (10 angular orders
// x 5 routines x 2 types x 2 instruction sets) made chebyshev_cpu.cpp the one file that a
// parallel build waited for (236 s and more at -O3 on 16 cores while the other files took
// seconds); split, they compile side by side.  chebyshev_cpu.cpp picks a table per call
// (cpu_isa).
#pragma once

#include <cstdint>

#include "chebyshev.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define DISTMLIP_HAVE_AVX2 1
#endif

namespace distmlip {
namespace rows {

using cheb::Problem;

template <typename scalar_t>
using ForwardRow = int64_t (*)(const Problem<scalar_t>&, int64_t, double*, int64_t, double*, double*,
                               bool);
template <typename scalar_t>
using VjpRow = void (*)(const Problem<scalar_t>&, int64_t, const scalar_t*, double*, int64_t,
                        double*, int64_t, double*, const double*, int64_t);
template <typename scalar_t>
using JvpRow = void (*)(const Problem<scalar_t>&, int64_t, const scalar_t*, const scalar_t*,
                        double*, int64_t, double*, double*, int64_t, double*, bool, bool,
                        const double*);

template <typename scalar_t>
struct RowTable {
  ForwardRow<scalar_t> forward;
  VjpRow<scalar_t> vjp;
  JvpRow<scalar_t> jvp_hvp;
};

// One table per translation unit (DISTMLIP_ROW_TABLE)
RowTable<double> rows_generic_f64();
RowTable<float> rows_generic_f32();
#ifdef DISTMLIP_HAVE_AVX2
RowTable<double> rows_avx2_f64();
RowTable<float> rows_avx2_f32();
#endif

// The definitions (used by the chebyshev_rows_*.cpp files only).  One non-inlined function per
// (routine, angular order, instruction set) with the routine inlined into it (one routine per
// function keeps the optimiser's budget per function small: inlining all orders into one
// function was measured to be up to 2x slower), plus a dispatcher.
#define DISTMLIP_DEFINE_ROWS(SUFFIX, ATTR)                                                       \
  template <typename scalar_t>                                                                  \
  ATTR __attribute__((noinline)) int64_t forward_pairs_##SUFFIX(                                \
      const Problem<scalar_t>& P, int64_t i, double* slot, int64_t cap, double* acc) {          \
    return cheb::host_forward_pairs(P, i, slot, cap, acc);                                      \
  }                                                                                             \
  template <typename scalar_t>                                                                  \
  ATTR __attribute__((noinline)) int64_t vjp_pairs_##SUFFIX(                                    \
      const Problem<scalar_t>& P, int64_t i, const scalar_t* g, double* slot, int64_t cap,      \
      double* gp, int64_t p_base) {                                                             \
    return cheb::host_vjp_pairs(P, i, g, slot, cap, gp, p_base);                                \
  }                                                                                             \
  template <typename scalar_t>                                                                  \
  ATTR __attribute__((noinline)) int64_t jvp_pairs_##SUFFIX(                                    \
      const Problem<scalar_t>& P, int64_t i, const scalar_t* v, double* slot, int64_t cap,      \
      double* jv) {                                                                             \
    return cheb::host_jvp_pairs(P, i, v, slot, cap, jv);                                        \
  }                                                                                             \
  template <typename scalar_t>                                                                  \
  ATTR __attribute__((noinline)) int64_t fv_pairs_##SUFFIX(                                     \
      const Problem<scalar_t>& P, int64_t i, double* slot, int64_t cap, double* acc) {          \
    return cheb::host_forward_pairs_for_vjp(P, i, slot, cap, acc);                              \
  }                                                                                             \
  template <typename scalar_t>                                                                  \
  ATTR __attribute__((noinline)) void vjp_radial_##SUFFIX(                                      \
      const Problem<scalar_t>& P, int64_t i, const scalar_t* g, double* slot, int64_t cap,      \
      double* gp, int64_t p_base) {                                                             \
    cheb::host_vjp_radial(P, i, g, slot, cap, gp, p_base);                                      \
  }                                                                                             \
  /* vjp_pass: the VJP's pair pass, whose slot the same centre's VJP then reuses (m_ready) */   \
  template <int NAC, typename scalar_t>                                                         \
  ATTR __attribute__((noinline)) int64_t forward_nac_##SUFFIX(                                  \
      const Problem<scalar_t>& P, int64_t i, double* slot, int64_t cap, double* acc,            \
      double* mom, bool vjp_pass) {                                                             \
    const int64_t m = vjp_pass ? fv_pairs_##SUFFIX(P, i, slot, cap, acc)                        \
                               : forward_pairs_##SUFFIX(P, i, slot, cap, acc);                  \
    cheb::centre_forward<NAC>(P, i, slot, cap, acc, m, mom);                                    \
    return m;                                                                                   \
  }                                                                                             \
  template <typename scalar_t>                                                                  \
  int64_t forward_row_##SUFFIX(const Problem<scalar_t>& P, int64_t i, double* slot, int64_t cap, \
                               double* acc, double* mom, bool vjp_pass) {                       \
    int64_t m = 0;                                                                              \
    DISTMLIP_DISPATCH_NA(P.n_a, NAC,                                                            \
                         m = forward_nac_##SUFFIX<NAC>(P, i, slot, cap, acc, mom, vjp_pass));   \
    return m;                                                                                   \
  }                                                                                             \
  /* m_ready >= 0: the slot holds the centre's pair pass (forward_row with vjp_pass) */         \
  template <int NAC, typename scalar_t>                                                         \
  ATTR __attribute__((noinline)) void vjp_nac_##SUFFIX(                                         \
      const Problem<scalar_t>& P, int64_t i, const scalar_t* g, double* slot, int64_t cap,      \
      double* gp, int64_t p_base, double* dRi, const double* mom, int64_t m_ready) {            \
    int64_t m = m_ready;                                                                        \
    if (m_ready >= 0)                                                                           \
      vjp_radial_##SUFFIX(P, i, g, slot, cap, gp, p_base);                                      \
    else                                                                                        \
      m = vjp_pairs_##SUFFIX(P, i, g, slot, cap, gp, p_base);                                   \
    cheb::centre_vjp<NAC>(P, i, g, slot, cap, gp, p_base, dRi, m, mom);                         \
  }                                                                                             \
  template <typename scalar_t>                                                                  \
  void vjp_row_##SUFFIX(const Problem<scalar_t>& P, int64_t i, const scalar_t* g, double* slot, \
                        int64_t cap, double* gp, int64_t p_base, double* dRi,                   \
                        const double* mom, int64_t m_ready) {                                   \
    DISTMLIP_DISPATCH_NA(P.n_a, NAC,                                                            \
                         vjp_nac_##SUFFIX<NAC>(P, i, g, slot, cap, gp, p_base, dRi, mom, m_ready)); \
  }                                                                                             \
  template <int NAC, bool JVP, bool HVP, typename scalar_t>                                     \
  ATTR __attribute__((noinline)) void jvp_hvp_nac_##SUFFIX(                                     \
      const Problem<scalar_t>& P, int64_t i, const scalar_t* g, const scalar_t* v,              \
      double* slot, int64_t cap, double* jv, double* hp, int64_t p_base, double* dHi,           \
      const double* mom) {                                                                      \
    const int64_t m = (JVP && !HVP) ? jvp_pairs_##SUFFIX(P, i, v, slot, cap, jv) : int64_t(-1);  \
    cheb::centre_jvp_hvp<NAC, JVP, HVP>(P, i, g, v, slot, cap, jv, hp, p_base, dHi, m, mom);    \
  }                                                                                             \
  template <typename scalar_t>                                                                  \
  void jvp_hvp_row_##SUFFIX(const Problem<scalar_t>& P, int64_t i, const scalar_t* g,          \
                            const scalar_t* v, double* slot, int64_t cap, double* jv,           \
                            double* hp, int64_t p_base, double* dHi, bool need_jvp,             \
                            bool need_hvp, const double* mom) {                                 \
    if (need_jvp && need_hvp) {                                                                 \
      DISTMLIP_DISPATCH_NA(P.n_a, NAC, (jvp_hvp_nac_##SUFFIX<NAC, true, true>(                  \
                                           P, i, g, v, slot, cap, jv, hp, p_base, dHi, mom)));  \
    } else if (need_jvp) {                                                                      \
      DISTMLIP_DISPATCH_NA(P.n_a, NAC, (jvp_hvp_nac_##SUFFIX<NAC, true, false>(                 \
                                           P, i, g, v, slot, cap, jv, hp, p_base, dHi, mom)));  \
    } else {                                                                                    \
      DISTMLIP_DISPATCH_NA(P.n_a, NAC, (jvp_hvp_nac_##SUFFIX<NAC, false, true>(                 \
                                           P, i, g, v, slot, cap, jv, hp, p_base, dHi, mom)));  \
    }                                                                                           \
  }

// The table of one instruction set's row functions for one scalar type (taking their addresses
// instantiates them in the translation unit that defines the table).
#define DISTMLIP_ROW_TABLE(SUFFIX, T, NAME)                                                      \
  RowTable<T> NAME() { return {&forward_row_##SUFFIX<T>, &vjp_row_##SUFFIX<T>, &jvp_hvp_row_##SUFFIX<T>}; }

}  // namespace rows
}  // namespace distmlip
