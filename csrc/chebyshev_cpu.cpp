// CPU operators of the fused aenet Chebyshev descriptor and their schema (the CUDA versions are
// registered by chebyshev_cuda_glue.cpp under the same names).
//
//   distmlip::chebyshev_forward(positions, species, pair_ptr, pair_j, pair_shift, typespin,
//                               rc_radial, n_radial, rc_angular, n_angular) -> G [N, D]
//   distmlip::chebyshev_forward_moments(<same inputs>) -> (G [N, D], moments [N, K])  (CPU only)
//   distmlip::chebyshev_backward(grad_G, <same inputs>, moments=None) -> dE/dR [N, 3]
//   distmlip::chebyshev_double_backward(grad_G, v, <same inputs>, need_jvp, need_hvp,
//                                       moments=None)
//       -> (J v [N, D], H v [N, 3])     (undefined-size-0 tensors for the parts not requested)
// moments: optional per-atom angular moments kept from chebyshev_forward_moments (force
// training): the VJP and JVP then skip rebuilding them (same results to rounding).
//
// Parallel over centre atoms (OpenMP, dynamic schedule, torch's thread count).  Each centre
// writes only its own output row and its own pairs' gradient slots, so no atomics are needed; the
// neighbour side of the pair gradients is added by one serial O(P) pass afterwards, which keeps
// the result bitwise deterministic for any thread count.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "chebyshev.h"
#include "chebyshev_rows.h"
#include "cpu_ops.h"

namespace distmlip {

// Shape / dtype / device checks shared with the CUDA glue (chebyshev_cuda_glue.cpp).
void chebyshev_check_inputs(const torch::Tensor& positions, const torch::Tensor& species,
                  const torch::Tensor& pair_ptr, const torch::Tensor& pair_j,
                  const torch::Tensor& pair_shift, const torch::Tensor& typespin, double rc_r,
                  int64_t n_r, double rc_a, int64_t n_a) {
  TORCH_CHECK(positions.dim() == 2 && positions.size(1) == 3,
              "chebyshev: positions must be [N, 3], got ", positions.sizes());
  TORCH_CHECK(positions.scalar_type() == torch::kFloat || positions.scalar_type() == torch::kDouble,
              "chebyshev: positions must be float32 or float64");
  const int64_t N = positions.size(0);
  TORCH_CHECK(species.dim() == 1 && species.size(0) == N && species.scalar_type() == torch::kLong,
              "chebyshev: species must be int64 [N]");
  TORCH_CHECK(pair_ptr.dim() == 1 && pair_ptr.size(0) == N + 1 &&
                  pair_ptr.scalar_type() == torch::kLong,
              "chebyshev: pair_ptr must be int64 [N + 1]");
  TORCH_CHECK(pair_j.dim() == 1 && pair_j.scalar_type() == torch::kLong,
              "chebyshev: pair_j must be int64 [P]");
  const int64_t P = pair_j.size(0);
  TORCH_CHECK(pair_shift.dim() == 2 && pair_shift.size(0) == P && pair_shift.size(1) == 3 &&
                  pair_shift.scalar_type() == positions.scalar_type(),
              "chebyshev: pair_shift must be [P, 3] with the dtype of positions");
  TORCH_CHECK(typespin.dim() == 1 && typespin.size(0) >= 1 &&
                  typespin.scalar_type() == torch::kDouble,
              "chebyshev: typespin must be float64 [T], T >= 1");
  TORCH_CHECK(n_r >= 0 && n_r <= cheb::kMaxOrder && n_a >= 0 && n_a <= cheb::kMaxOrder,
              "chebyshev: orders must be in [0, ", cheb::kMaxOrder, "], got ", n_r, " and ", n_a);
  TORCH_CHECK(rc_r > 0 && rc_a > 0, "chebyshev: cutoffs must be positive");
  for (const auto* t : {&positions, &species, &pair_ptr, &pair_j, &pair_shift, &typespin}) {
    TORCH_CHECK(t->is_contiguous(), "chebyshev: inputs must be contiguous");
    TORCH_CHECK(t->device() == positions.device(), "chebyshev: all inputs must be on one device");
  }
}

namespace {

using cheb::Problem;

// Value checks: only on CPU (on CUDA they would need a host synchronisation).
void check_values_cpu(const torch::Tensor& species, const torch::Tensor& pair_ptr,
                      const torch::Tensor& pair_j, const torch::Tensor& typespin) {
  const int64_t N = species.size(0);
  const int64_t P = pair_j.size(0);
  const int64_t T = typespin.size(0);
  const int64_t* sp = species.data_ptr<int64_t>();
  const int64_t* ptr = pair_ptr.data_ptr<int64_t>();
  const int64_t* pj = pair_j.data_ptr<int64_t>();
  TORCH_CHECK(ptr[0] == 0 && ptr[N] == P, "chebyshev: pair_ptr must start at 0 and end at P = ", P,
              " (got ", ptr[0], " and ", ptr[N], ")");
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(ptr[i + 1] >= ptr[i], "chebyshev: pair_ptr must be non-decreasing (atom ", i, ")");
    TORCH_CHECK(sp[i] >= 0 && sp[i] < T, "chebyshev: species index ", sp[i], " of atom ", i,
                " out of range [0, ", T, ")");
  }
  // min and max first (a vectorised pass: this check runs on every kernel call), the offending
  // pair only when there is one
  int64_t lo = 0, hi = 0;
  if (P > 0) {
    lo = hi = pj[0];
    for (int64_t p = 0; p < P; ++p) {
      lo = std::min(lo, pj[p]);
      hi = std::max(hi, pj[p]);
    }
  }
  if (lo < 0 || hi >= N) {
    for (int64_t p = 0; p < P; ++p) {
      TORCH_CHECK(pj[p] >= 0 && pj[p] < N, "chebyshev: pair_j[", p, "] = ", pj[p],
                  " out of range [0, ", N, ")");
    }
  }
}

// Per-call scratch that the kernels write before they read it (every slot field up to the
// entries in use, every pair gradient; checked with valgrind): not zero-filled, which for the
// pipelined force operator's slots and pair gradients was a megabyte of memset per step.
struct Scratch {
  std::unique_ptr<double[]> p;
  explicit Scratch(size_t n) : p(new double[n]) {}
  double* data() { return p.get(); }
  double& operator[](size_t k) { return p[k]; }
};

// Neighbour count (within rc_a) from which a centre's angular sums use the moment form
// (linear in the neighbours, four neighbours per vector step) instead of the triplet loop
// (quadratic), per kernel: crossovers measured on the benchmark structures (EC dimer, Li slab,
// dense bulk; 9-180 neighbours, angular order 4): the forward and the JVP break even at about
// 15 neighbours, the VJP (two passes over the neighbours) at about 22.  With the forward's
// moments row the VJP and JVP follow the forward's choice (their moment form is then cheaper).
// DISTMLIP_CHEB_ANGULAR=triplets | moments forces one form (tests).
enum class Kernel { forward, vjp, jvp };
int64_t angular_moments_min(Kernel k) {
  const char* env = std::getenv("DISTMLIP_CHEB_ANGULAR");
  if (env != nullptr && std::string(env) == "triplets") return int64_t(1) << 40;
  if (env != nullptr && std::string(env) == "moments") return 0;
  return k == Kernel::vjp ? 22 : 15;
}

template <typename scalar_t>
Problem<scalar_t> make_problem(const torch::Tensor& positions, const torch::Tensor& species,
                               const torch::Tensor& pair_ptr, const torch::Tensor& pair_j,
                               const torch::Tensor& pair_shift, const torch::Tensor& typespin,
                               double rc_r, int64_t n_r, double rc_a, int64_t n_a,
                               Kernel kernel) {
  Problem<scalar_t> P;
  P.pos = positions.data_ptr<scalar_t>();
  P.species = species.data_ptr<int64_t>();
  P.ptr = pair_ptr.data_ptr<int64_t>();
  P.pj = pair_j.data_ptr<int64_t>();
  P.shift = pair_shift.data_ptr<scalar_t>();
  P.typespin = typespin.data_ptr<double>();
  P.n_atoms = positions.size(0);
  P.n_pairs = pair_j.size(0);
  P.rc_r = rc_r;
  P.rc_a = rc_a;
  P.n_r = int(n_r);
  P.n_a = int(n_a);
  P.weighted = typespin.size(0) > 1 ? 1 : 0;
  P.moments_min = angular_moments_min(kernel);
  return P;
}

int64_t max_neighbours(const int64_t* ptr, int64_t N) {
  int64_t m = 1;
  for (int64_t i = 0; i < N; ++i) m = std::max(m, ptr[i + 1] - ptr[i]);
  return m;
}

int num_threads() {
  return at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
}


// Instruction set used by the CPU kernels: 2 = AVX2 + FMA, 0 = generic.  The environment variable
// DISTMLIP_CPU_ISA=generic forces the generic code (read at every call; used by the tests).
int64_t cpu_isa() {
#ifdef DISTMLIP_HAVE_AVX2
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* env = std::getenv("DISTMLIP_CPU_ISA");
  if (env != nullptr && std::string(env) == "generic") return 0;
  return has ? 2 : 0;
#else
  return 0;
#endif
}

// The row functions of the instruction set in use (chebyshev_rows.h)
template <typename scalar_t>
rows::RowTable<scalar_t> row_table();
template <>
rows::RowTable<double> row_table<double>() {
#ifdef DISTMLIP_HAVE_AVX2
  if (cpu_isa() == 2) return rows::rows_avx2_f64();
#endif
  return rows::rows_generic_f64();
}
template <>
rows::RowTable<float> row_table<float>() {
#ifdef DISTMLIP_HAVE_AVX2
  if (cpu_isa() == 2) return rows::rows_avx2_f32();
#endif
  return rows::rows_generic_f32();
}
template <typename scalar_t>
rows::ForwardRow<scalar_t> pick_forward() { return row_table<scalar_t>().forward; }
template <typename scalar_t>
rows::VjpRow<scalar_t> pick_vjp() { return row_table<scalar_t>().vjp; }
template <typename scalar_t>
rows::JvpRow<scalar_t> pick_jvp() { return row_table<scalar_t>().jvp_hvp; }

// ---- kernels (outside the dispatch macros: OpenMP pragmas cannot sit in macro arguments) ----

// mom (optional): [N, moments_row_size(n_a)] rows of the angular moments (force training)
template <typename scalar_t>
void forward_impl(const Problem<scalar_t>& P, scalar_t* out, double* mom = nullptr) {
  const int K = cheb::moments_row_size(P.n_a);
  const int64_t N = P.n_atoms;
  const int D = P.dim();
  const int64_t cap = cheb::host_cap(max_neighbours(P.ptr, N));
  const auto row = pick_forward<scalar_t>();
#pragma omp parallel num_threads(num_threads())
  {
    Scratch slot(size_t(cheb::kHostSlotFields) * size_t(cap));
    std::vector<double> acc(D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < N; ++i) {
      std::fill(acc.begin(), acc.end(), 0.0);
      row(P, i, slot.data(), cap, acc.data(), mom != nullptr ? mom + i * K : nullptr, false);
      for (int d = 0; d < D; ++d) out[i * D + d] = static_cast<scalar_t>(acc[d]);
    }
  }
}

// The pair gradients of the backward kernels are produced chunk by chunk of centres (at most
// chunk_pairs pairs, >= one centre) into a bounded buffer, so the extra memory does not grow with
// the system.  Result per atom k: sum of the neighbour-side pair terms in increasing pair order
// (serial pass after every chunk), plus the centre's own term at the end: the summation order is
// the same for every chunk size and thread count, so results are bitwise reproducible.
// DISTMLIP_CHEB_CHUNK_PAIRS overrides the chunk size (tests use it to force many chunks).
int64_t chunk_pairs(int64_t cap) {
  const char* env = std::getenv("DISTMLIP_CHEB_CHUNK_PAIRS");
  if (env != nullptr) {
    const long long v = std::atoll(env);
    if (v > 0) return int64_t(v);
  }
  return std::max<int64_t>(int64_t(1) << 15, int64_t(8) * num_threads() * cap);
}

// next chunk end: largest i1 > i0 with ptr[i1] - ptr[i0] <= limit (at least i0 + 1)
int64_t chunk_end(const int64_t* ptr, int64_t N, int64_t i0, int64_t limit) {
  int64_t i1 = i0 + 1;
  while (i1 < N && ptr[i1 + 1] - ptr[i0] <= limit) ++i1;
  return i1;
}

template <typename scalar_t>
void vjp_impl(const Problem<scalar_t>& P, const scalar_t* pg, double* pdR,
              const double* mom = nullptr) {
  const int K = cheb::moments_row_size(P.n_a);
  const int64_t N = P.n_atoms;
  const int D = P.dim();
  const int64_t cap = cheb::host_cap(max_neighbours(P.ptr, N));
  const int64_t limit = chunk_pairs(cap);
  const auto row = pick_vjp<scalar_t>();
  std::vector<double> own(size_t(3 * N));
  Scratch gp(size_t(3 * std::min<int64_t>(std::max<int64_t>(P.n_pairs, 1),
                                                      std::max(limit, cap))));
  std::fill(pdR, pdR + 3 * N, 0.0);
  for (int64_t i0 = 0; i0 < N;) {
    const int64_t i1 = chunk_end(P.ptr, N, i0, limit);
    const int64_t p0 = P.ptr[i0], p1 = P.ptr[i1];
#pragma omp parallel num_threads(num_threads())
    {
      Scratch slot(size_t(cheb::kHostSlotFields) * size_t(cap));
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = i0; i < i1; ++i) {
        row(P, i, pg + i * D, slot.data(), cap, gp.data(), p0, own.data() + 3 * i,
            mom != nullptr ? mom + i * K : nullptr, -1);
      }
    }
    // neighbour side: dE/dR_j += gp[p]  (serial, in pair order)
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t j = P.pj[p];
      pdR[3 * j + 0] += gp[3 * (p - p0) + 0];
      pdR[3 * j + 1] += gp[3 * (p - p0) + 1];
      pdR[3 * j + 2] += gp[3 * (p - p0) + 2];
    }
    i0 = i1;
  }
  for (int64_t q = 0; q < 3 * N; ++q) pdR[q] += own[q];
}

template <typename scalar_t>
void jvp_hvp_impl(const Problem<scalar_t>& P, const scalar_t* pg, const scalar_t* pv,
                  scalar_t* pjv, double* phv, const double* mom = nullptr) {
  const int K = cheb::moments_row_size(P.n_a);
  const int64_t N = P.n_atoms;
  const int D = P.dim();
  const int64_t cap = cheb::host_cap(max_neighbours(P.ptr, N));
  const bool need_jvp = pjv != nullptr;
  const bool need_hvp = phv != nullptr;
  const int64_t limit = need_hvp ? chunk_pairs(cap) : std::max<int64_t>(P.n_pairs, 1);
  const auto row = pick_jvp<scalar_t>();
  std::vector<double> own(need_hvp ? size_t(3 * N) : size_t(0));
  std::vector<double> hp(need_hvp ? size_t(3 * std::min<int64_t>(std::max<int64_t>(P.n_pairs, 1),
                                                                 std::max(limit, cap)))
                                  : size_t(0));
  if (need_hvp) std::fill(phv, phv + 3 * N, 0.0);
  for (int64_t i0 = 0; i0 < N;) {
    const int64_t i1 = need_hvp ? chunk_end(P.ptr, N, i0, limit) : N;
    const int64_t p0 = P.ptr[i0], p1 = P.ptr[i1];
#pragma omp parallel num_threads(num_threads())
    {
      Scratch slot(size_t(cheb::kHostSlotFields) * size_t(cap));
      std::vector<double> acc(D);
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = i0; i < i1; ++i) {
        std::fill(acc.begin(), acc.end(), 0.0);
        row(P, i, pg + i * D, pv, slot.data(), cap, acc.data(), need_hvp ? hp.data() : nullptr, p0,
            need_hvp ? own.data() + 3 * i : nullptr, need_jvp, need_hvp,
            mom != nullptr ? mom + i * K : nullptr);
        if (need_jvp) {
          for (int d = 0; d < D; ++d) pjv[i * D + d] = static_cast<scalar_t>(acc[d]);
        }
      }
    }
    if (need_hvp) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t j = P.pj[p];
        phv[3 * j + 0] += hp[3 * (p - p0) + 0];
        phv[3 * j + 1] += hp[3 * (p - p0) + 1];
        phv[3 * j + 2] += hp[3 * (p - p0) + 2];
      }
    }
    i0 = i1;
  }
  if (need_hvp) {
    for (int64_t q = 0; q < 3 * N; ++q) phv[q] += own[q];
  }
}

// Forward and VJP in one pass over the centres (see chebyshev_forward_vjp_cpu): per chunk of
// centres (as vjp_impl), blocks of B centres: each centre's pair pass (the VJP's,
// which also serves the forward) fills its own slot, then its G row and moments row; then
// rows(c0, c1) turns the block's G rows into g rows; then each centre's VJP from its slot.  The
// blocks' slots stay in the core's cache, so the VJP does not redo the pair pass (gathers, square
// roots, cutoff polynomials, compaction): about a third of a forward saved at dense cutoffs.
// Results are bitwise those of forward_impl then vjp_impl (same arithmetic, same order).
// B: as many centres as keep the block's slots within about 512 KB (in a core's L2 cache with
// room to spare), from 8 (dense bulk at 10.5/8.0: about 100 KB per centre) to 64 (small
// molecules: the networks then run on blocks of 64 atoms, not of a handful per species).  A
// function of the neighbour lists only, not of the thread count: the blocks, and with them the
// networks' blocks, are reproducible.
int64_t pipeline_centres(int64_t slot_size) {
  return std::clamp<int64_t>((int64_t(1) << 16) / std::max<int64_t>(slot_size, 1), 8, 64);
}

// vir (optional): [N, 9] per centre, sum over its pairs of r_p (x) d(g.G_i)/d r_p (row-major
// 3x3): summed over the centres of a structure, the virial dE/d(strain) (the stress times the
// volume), from the pair gradients that the VJP forms anyway, with no per-pair storage.
void forward_vjp_impl(const Problem<double>& P, double* G, double* mom, double* g, double* pdR,
                      const std::function<void(int64_t, int64_t)>& rows, double* vir = nullptr) {
  const int K = cheb::moments_row_size(P.n_a);
  const int64_t N = P.n_atoms;
  const int D = P.dim();
  const int64_t cap = cheb::host_cap(max_neighbours(P.ptr, N));
  const int64_t slot_size = int64_t(cheb::kHostSlotFields) * cap;
  const int64_t limit = chunk_pairs(cap);
  const int64_t B = pipeline_centres(slot_size);
  const auto forward_row = pick_forward<double>();
  const auto vjp_row = pick_vjp<double>();
  std::vector<double> own(size_t(3 * N));
  Scratch gp(size_t(3 * std::min<int64_t>(std::max<int64_t>(P.n_pairs, 1),
                                                      std::max(limit, B * cap))));
  std::fill(pdR, pdR + 3 * N, 0.0);
  for (int64_t i0 = 0; i0 < N;) {
    // chunks end on multiples of B (at least one block), so that the blocks, and
    // with them the networks' blocks, are the same for every chunk size and thread count
    int64_t i1 = chunk_end(P.ptr, N, i0, limit);
    if (i1 < N) {
      const int64_t aligned = i1 / B * B;
      i1 = aligned > i0 ? aligned : std::min(N, i0 + B);
    }
    const int64_t p0 = P.ptr[i0], p1 = P.ptr[i1];
    const int64_t n_blocks = (i1 - i0 + B - 1) / B;
#pragma omp parallel num_threads(num_threads())
    {
      Scratch slots(size_t(B * slot_size));
      std::vector<double> acc(D);
      std::vector<int64_t> ms(size_t(B), 0);
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < n_blocks; ++b) {
        const int64_t c0 = i0 + b * B, c1 = std::min(i1, c0 + B);
        for (int64_t i = c0; i < c1; ++i) {
          std::fill(acc.begin(), acc.end(), 0.0);
          ms[i - c0] = forward_row(P, i, slots.data() + (i - c0) * slot_size, cap, acc.data(),
                                   mom != nullptr ? mom + i * K : nullptr, true);
          std::copy(acc.begin(), acc.end(), G + i * D);
        }
        rows(c0, c1);
        for (int64_t i = c0; i < c1; ++i) {
          vjp_row(P, i, g + i * D, slots.data() + (i - c0) * slot_size, cap, gp.data(), p0,
                 own.data() + 3 * i, mom != nullptr ? mom + i * K : nullptr, ms[i - c0]);
          if (vir != nullptr)
            cheb::host_centre_virial(P.ptr[i + 1] - P.ptr[i], slots.data() + (i - c0) * slot_size, cap,
                                     gp.data() + 3 * (P.ptr[i] - p0), vir + 9 * i);
        }
      }
    }
    for (int64_t p = p0; p < p1; ++p) {  // neighbour side, serial, in pair order (as vjp_impl)
      const int64_t j = P.pj[p];
      pdR[3 * j + 0] += gp[3 * (p - p0) + 0];
      pdR[3 * j + 1] += gp[3 * (p - p0) + 1];
      pdR[3 * j + 2] += gp[3 * (p - p0) + 2];
    }
    i0 = i1;
  }
  for (int64_t q = 0; q < 3 * N; ++q) pdR[q] += own[q];
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> chebyshev_forward_vjp_cpu(
    const torch::Tensor& positions, const torch::Tensor& species, const torch::Tensor& pair_ptr,
    const torch::Tensor& pair_j, const torch::Tensor& pair_shift, const torch::Tensor& typespin,
    double rc_r, int64_t n_r, double rc_a, int64_t n_a,
    const std::function<void(int64_t, int64_t, const double*, double*)>& rows, torch::Tensor* virial) {
  chebyshev_check_inputs(positions, species, pair_ptr, pair_j, pair_shift, typespin, rc_r, n_r, rc_a, n_a);
  TORCH_CHECK(positions.scalar_type() == torch::kDouble,
              "chebyshev_forward_vjp: float64 positions only");
  check_values_cpu(species, pair_ptr, pair_j, typespin);
  const int64_t N = positions.size(0);
  const int D = cheb::descriptor_dim(int(n_r), int(n_a), typespin.size(0) > 1);
  const int K = cheb::moments_row_size(int(n_a));
  const auto opt = positions.options();
  auto G = torch::empty({N, D}, opt);
  auto g = torch::empty({N, D}, opt);
  auto mom = torch::empty({N, K}, opt);
  auto dR = torch::empty({N, 3}, opt);
  const auto P = make_problem<double>(positions, species, pair_ptr, pair_j, pair_shift, typespin,
                                      rc_r, n_r, rc_a, n_a, Kernel::forward);
  double* pG = G.data_ptr<double>();
  double* pg = g.data_ptr<double>();
  if (virial != nullptr) *virial = torch::empty({N, 9}, opt);
  forward_vjp_impl(P, pG, K > 0 ? mom.data_ptr<double>() : nullptr, pg, dR.data_ptr<double>(),
                   [&](int64_t c0, int64_t c1) { rows(c0, c1, pG, pg); },
                   virial != nullptr ? virial->data_ptr<double>() : nullptr);
  return {G, mom, g, dR};
}

torch::Tensor chebyshev_forward_cpu(const torch::Tensor& positions, const torch::Tensor& species,
                                    const torch::Tensor& pair_ptr, const torch::Tensor& pair_j,
                                    const torch::Tensor& pair_shift, const torch::Tensor& typespin,
                                    double rc_r, int64_t n_r, double rc_a, int64_t n_a) {
  chebyshev_check_inputs(positions, species, pair_ptr, pair_j, pair_shift, typespin, rc_r, n_r, rc_a, n_a);
  check_values_cpu(species, pair_ptr, pair_j, typespin);
  const int64_t N = positions.size(0);
  const int D = cheb::descriptor_dim(int(n_r), int(n_a), typespin.size(0) > 1);
  auto G = torch::empty({N, D}, positions.options());
  AT_DISPATCH_FLOATING_TYPES(positions.scalar_type(), "chebyshev_forward_cpu", [&] {
    const auto P = make_problem<scalar_t>(positions, species, pair_ptr, pair_j, pair_shift,
                                          typespin, rc_r, n_r, rc_a, n_a, Kernel::forward);
    forward_impl<scalar_t>(P, G.data_ptr<scalar_t>());
  });
  return G;
}

// Forward that also returns the per-atom angular moments ([N, moments_row_size(n_a)] float64;
// [N, 0] for orders above kMaxSpecialised) for chebyshev_backward / chebyshev_double_backward:
// per-atom data only (independent of the number of neighbours), kept by the autograd wrapper for
// force training so that the VJP and JVP skip rebuilding the moments.
std::tuple<torch::Tensor, torch::Tensor> chebyshev_forward_moments_cpu(
    const torch::Tensor& positions, const torch::Tensor& species, const torch::Tensor& pair_ptr,
    const torch::Tensor& pair_j, const torch::Tensor& pair_shift, const torch::Tensor& typespin,
    double rc_r, int64_t n_r, double rc_a, int64_t n_a) {
  chebyshev_check_inputs(positions, species, pair_ptr, pair_j, pair_shift, typespin, rc_r, n_r, rc_a, n_a);
  check_values_cpu(species, pair_ptr, pair_j, typespin);
  const int64_t N = positions.size(0);
  const int D = cheb::descriptor_dim(int(n_r), int(n_a), typespin.size(0) > 1);
  const int K = cheb::moments_row_size(int(n_a));
  auto G = torch::empty({N, D}, positions.options());
  auto mom = torch::empty({N, K}, positions.options().dtype(torch::kDouble));
  AT_DISPATCH_FLOATING_TYPES(positions.scalar_type(), "chebyshev_forward_moments_cpu", [&] {
    const auto P = make_problem<scalar_t>(positions, species, pair_ptr, pair_j, pair_shift,
                                          typespin, rc_r, n_r, rc_a, n_a, Kernel::forward);
    forward_impl<scalar_t>(P, G.data_ptr<scalar_t>(), K > 0 ? mom.data_ptr<double>() : nullptr);
  });
  return {G, mom};
}

namespace {
// the moments row pointer when `moments` holds usable rows (else nullptr: rebuilt per centre)
const double* moments_rows(const std::optional<torch::Tensor>& moments, int64_t N, int64_t n_a) {
  if (!moments.has_value() || !moments->defined()) return nullptr;
  const int64_t K = cheb::moments_row_size(int(n_a));
  if (K == 0) return nullptr;
  const auto& m = *moments;
  TORCH_CHECK(m.dim() == 2 && m.size(0) == N && m.size(1) == K &&
                  m.scalar_type() == torch::kDouble && m.is_contiguous() && m.device().is_cpu(),
              "chebyshev: moments must be the contiguous float64 [N, ", K,
              "] tensor of chebyshev_forward_moments, got ", m.sizes());
  return m.data_ptr<double>();
}
}  // namespace

torch::Tensor chebyshev_backward_cpu(const torch::Tensor& grad_G, const torch::Tensor& positions,
                                     const torch::Tensor& species, const torch::Tensor& pair_ptr,
                                     const torch::Tensor& pair_j, const torch::Tensor& pair_shift,
                                     const torch::Tensor& typespin, double rc_r, int64_t n_r,
                                     double rc_a, int64_t n_a,
                                     const std::optional<torch::Tensor>& moments) {
  chebyshev_check_inputs(positions, species, pair_ptr, pair_j, pair_shift, typespin, rc_r, n_r, rc_a, n_a);
  check_values_cpu(species, pair_ptr, pair_j, typespin);
  const int64_t N = positions.size(0);
  const int D = cheb::descriptor_dim(int(n_r), int(n_a), typespin.size(0) > 1);
  TORCH_CHECK(grad_G.dim() == 2 && grad_G.size(0) == N && grad_G.size(1) == D,
              "chebyshev_backward: grad_G must be [N, ", D, "], got ", grad_G.sizes());
  auto g = grad_G.to(positions.scalar_type()).contiguous();
  auto dR = torch::empty({N, 3}, positions.options().dtype(torch::kDouble));
  const double* mom = moments_rows(moments, N, n_a);
  AT_DISPATCH_FLOATING_TYPES(positions.scalar_type(), "chebyshev_backward_cpu", [&] {
    const auto P = make_problem<scalar_t>(positions, species, pair_ptr, pair_j, pair_shift,
                                          typespin, rc_r, n_r, rc_a, n_a, Kernel::vjp);
    vjp_impl<scalar_t>(P, g.data_ptr<scalar_t>(), dR.data_ptr<double>(), mom);
  });
  return dR.to(positions.scalar_type());
}

std::tuple<torch::Tensor, torch::Tensor> chebyshev_double_backward_cpu(
    const torch::Tensor& grad_G, const torch::Tensor& v, const torch::Tensor& positions,
    const torch::Tensor& species, const torch::Tensor& pair_ptr, const torch::Tensor& pair_j,
    const torch::Tensor& pair_shift, const torch::Tensor& typespin, double rc_r, int64_t n_r,
    double rc_a, int64_t n_a, bool need_jvp, bool need_hvp,
    const std::optional<torch::Tensor>& moments) {
  return chebyshev_double_backward_strain_cpu(grad_G, v, positions, species, pair_ptr, pair_j, pair_shift,
                                              typespin, rc_r, n_r, rc_a, n_a, need_jvp, need_hvp, moments,
                                              std::nullopt, std::nullopt);
}

std::tuple<torch::Tensor, torch::Tensor> chebyshev_double_backward_strain_cpu(
    const torch::Tensor& grad_G, const torch::Tensor& v, const torch::Tensor& positions,
    const torch::Tensor& species, const torch::Tensor& pair_ptr, const torch::Tensor& pair_j,
    const torch::Tensor& pair_shift, const torch::Tensor& typespin, double rc_r, int64_t n_r,
    double rc_a, int64_t n_a, bool need_jvp, bool need_hvp,
    const std::optional<torch::Tensor>& moments, const std::optional<torch::Tensor>& strain,
    const std::optional<torch::Tensor>& structure) {
  chebyshev_check_inputs(positions, species, pair_ptr, pair_j, pair_shift, typespin, rc_r, n_r, rc_a, n_a);
  check_values_cpu(species, pair_ptr, pair_j, typespin);
  const int64_t N = positions.size(0);
  const int D = cheb::descriptor_dim(int(n_r), int(n_a), typespin.size(0) > 1);
  TORCH_CHECK(grad_G.dim() == 2 && grad_G.size(0) == N && grad_G.size(1) == D,
              "chebyshev_double_backward: grad_G must be [N, ", D, "], got ", grad_G.sizes());
  TORCH_CHECK(v.dim() == 2 && v.size(0) == N && v.size(1) == 3,
              "chebyshev_double_backward: v must be [N, 3], got ", v.sizes());
  auto g = grad_G.to(positions.scalar_type()).contiguous();
  auto vv = v.to(positions.scalar_type()).contiguous();
  torch::Tensor jv = need_jvp ? torch::empty({N, D}, positions.options())
                              : torch::empty({0}, positions.options());
  auto dopt = positions.options().dtype(torch::kDouble);
  torch::Tensor hv = need_hvp ? torch::empty({N, 3}, dopt) : torch::empty({0}, dopt);
  if (!need_jvp && !need_hvp) return {jv, hv.to(positions.scalar_type())};
  const double* mom = moments_rows(moments, N, n_a);
  const bool with_strain = strain.has_value() && strain->defined();
  if (with_strain) {
    // the per-pair path of the Hessian (centre_jvp_hvp without the host pair pass) has no strain
    TORCH_CHECK(!need_hvp, "chebyshev_double_backward: a strain tangent is supported for the JVP only");
    TORCH_CHECK(structure.has_value() && structure->dim() == 1 && structure->size(0) == N &&
                    structure->scalar_type() == torch::kLong && structure->is_contiguous(),
                "chebyshev_double_backward: a strain tangent needs contiguous int64 structure [N]");
    TORCH_CHECK(strain->dim() == 3 && strain->size(1) == 3 && strain->size(2) == 3 &&
                    strain->scalar_type() == torch::kDouble && strain->is_contiguous(),
                "chebyshev_double_backward: strain must be contiguous float64 [B, 3, 3]");
    const int64_t* ps = structure->data_ptr<int64_t>();
    for (int64_t a = 0; a < N; ++a)
      TORCH_CHECK(ps[a] >= 0 && ps[a] < strain->size(0), "chebyshev_double_backward: atom ", a,
                  " has structure index ", ps[a], ", the strain has ", strain->size(0), " structures");
  }
  AT_DISPATCH_FLOATING_TYPES(positions.scalar_type(), "chebyshev_double_backward_cpu", [&] {
    auto P = make_problem<scalar_t>(positions, species, pair_ptr, pair_j, pair_shift,
                                    typespin, rc_r, n_r, rc_a, n_a, Kernel::jvp);
    if (with_strain) {
      P.strain = strain->data_ptr<double>();
      P.structure = structure->data_ptr<int64_t>();
    }
    jvp_hvp_impl<scalar_t>(P, g.data_ptr<scalar_t>(), vv.data_ptr<scalar_t>(),
                           need_jvp ? jv.data_ptr<scalar_t>() : nullptr,
                           need_hvp ? hv.data_ptr<double>() : nullptr, mom);
  });
  return {jv, hv.to(positions.scalar_type())};
}

}  // namespace distmlip

TORCH_LIBRARY_FRAGMENT(distmlip, m) {
  m.def(
      "chebyshev_forward(Tensor positions, Tensor species, Tensor pair_ptr, Tensor pair_j, "
      "Tensor pair_shift, Tensor typespin, float rc_radial, int n_radial, float rc_angular, "
      "int n_angular) -> Tensor");
  // CPU only: the forward plus the per-atom angular moments that the two below accept
  m.def(
      "chebyshev_forward_moments(Tensor positions, Tensor species, Tensor pair_ptr, "
      "Tensor pair_j, Tensor pair_shift, Tensor typespin, float rc_radial, int n_radial, "
      "float rc_angular, int n_angular) -> (Tensor, Tensor)");
  m.def(
      "chebyshev_backward(Tensor grad_G, Tensor positions, Tensor species, Tensor pair_ptr, "
      "Tensor pair_j, Tensor pair_shift, Tensor typespin, float rc_radial, int n_radial, "
      "float rc_angular, int n_angular, Tensor? moments=None) -> Tensor");
  m.def(
      "chebyshev_double_backward(Tensor grad_G, Tensor v, Tensor positions, Tensor species, "
      "Tensor pair_ptr, Tensor pair_j, Tensor pair_shift, Tensor typespin, float rc_radial, "
      "int n_radial, float rc_angular, int n_angular, bool need_jvp, bool need_hvp, "
      "Tensor? moments=None) -> (Tensor, Tensor)");
  // 2 when the CPU kernels use the AVX2 + FMA code, 0 for the generic code
  m.def("chebyshev_cpu_isa() -> int", &distmlip::cpu_isa);
}

TORCH_LIBRARY_IMPL(distmlip, CPU, m) {
  m.impl("chebyshev_forward", &distmlip::chebyshev_forward_cpu);
  m.impl("chebyshev_forward_moments", &distmlip::chebyshev_forward_moments_cpu);
  m.impl("chebyshev_backward", &distmlip::chebyshev_backward_cpu);
  m.impl("chebyshev_double_backward", &distmlip::chebyshev_double_backward_cpu);
}
