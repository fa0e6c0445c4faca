// CPU operators of the per-species atomic networks of a Behler-Parrinello potential, with the
// input gradient dy/dx in closed form and the weight gradients of any loss on (y, dy/dx).
//
//   distmlip::bpnn_nets_forward(x [N, D], species [N], params, activations, with_grad)
//       -> (y [N], dy/dx [N, D] or [0])
//   distmlip::bpnn_nets_backward(x, species, params, activations, ybar?, ubar?, need_x)
//       -> [grad of every parameter..., x-bar [N, D] or [0]]
//
// params: W_1, b_1, ..., W_L, b_L of species 0, then of species 1, ... (the order of
// ``[p for net in nets for p in net.parameters()]``), W_k [n_k, n_{k-1}], b_k [n_k], n_L = 1;
// activations: one code per hidden layer (0 tanh, 1 sigmoid, 2 linear, 3 softplus with
// torch's threshold 20, 4 silu).  Atom a is evaluated by the network of species[a].
//
// Why: the networks of a Behler-Parrinello potential are tiny (a few hundred weights per
// element), so evaluated with torch operators (one batched product per layer, autograd for the
// backward) a training step is dominated by per-operation overhead, not arithmetic.  Here every
// atom runs through its network in one loop nest, in double precision whatever the storage
// type.  The backward recomputes the forward of its atoms (cheaper than storing every layer).
//
// Notation (per atom, as in distmlip/models/forcenet.py): h_0 = x, a_k = W_k h_{k-1} + b_k,
// h_k = s_k(a_k) (k = 1..L-1), y = W_L h_{L-1} + b_L; g_{L-1} = W_L, d_k = g_k * s_k'(a_k),
// g_{k-1} = W_k^T d_k, dy/dx = g_0.  Backward with cotangents ybar (on y) and u_0 = ubar (on g_0):
// up the g-chain W_k gets d_k u_{k-1}^T, dbar_k = W_k u_{k-1}, a_k gets dbar_k * g_k * s_k'' and
// u_k = dbar_k * s_k'; W_L gets u_{L-1}; then down the y-chain as usual, adding the a_k terms.
//
// Determinism: the atoms are cut into blocks that depend only on N and the network size (not
// on the thread count); each block sums its weight gradients in atom order into its own
// buffer, and the blocks are added in block order, so results are bitwise identical for any
// number of threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "cpu_ops.h"

#include <algorithm>
#include <cmath>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace distmlip {
namespace {

// The hot loops are compiled for AVX2 and for generic x86-64, chosen at load time
// (GCC function multi-versioning); elsewhere one generic version.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DM_NETS_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define DM_NETS_CLONES
#endif

// The codes of distmlip/models/activations.py (its kernel_code column; tests/test_activations.py
// checks that the two agree).
enum ActCode : int64_t { kTanh = 0, kSigmoid = 1, kLinear = 2, kSoftplus = 3, kSilu = 4, kNumActivations = 5 };

int nets_threads() { return at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads()); }

// The T networks, packed in double with every width n_k (k < L) padded to a multiple of 4,
// p_k, with zero weights: padded neurons get zero input weights and zero output weights, so
// they change nothing, and every product below runs on whole 4-double vectors.  Per species
// and hidden layer k = 1..L-1: W_k [p_k, p_{k-1}] row-major, W_k^T [p_{k-1}, p_k], b_k [p_k];
// last layer: w_L [p_{L-1}], b_L.
struct Nets {
  int T = 0, L = 0, pmax = 0;
  std::vector<int> n, p;         // widths n_0 .. n_L, padded widths p_0 .. p_{L-1}
  std::vector<int64_t> act;      // L - 1 codes
  std::vector<int64_t> w_off, wt_off, b_off;  // hidden layer k (index k - 1) within a species block
  int64_t wl_off = 0, bl_off = 0, per_species = 0;
  // gradient block of a species (padded layout): Wbar_k [p_k, p_{k-1}], bbar_k [p_k], ..., w_L, b_L
  std::vector<int64_t> gw_off, gb_off;
  int64_t gwl_off = 0, gbl_off = 0, grad_per_species = 0;
  // doubles per atom of the forward's saved intermediates (h_k, s'_k, s''_k, g_k for the hidden
  // layers k = 1..L-1, padded widths), which a backward can load instead of recomputing
  int64_t save_row = 0;
  std::vector<double> data;

  const double* species_block(int64_t t) const { return data.data() + t * per_species; }
};

inline int pad4(int v) { return (v + 3) / 4 * 4; }

Nets pack_nets(const std::vector<torch::Tensor>& params, const std::vector<int64_t>& act,
               int64_t D, c10::ScalarType dtype) {
  Nets nets;
  nets.L = int(act.size()) + 1;
  TORCH_CHECK(!params.empty() && params.size() % (2 * size_t(nets.L)) == 0,
              "bpnn_nets: expected 2 x ", nets.L, " parameters per species, got ", params.size());
  nets.T = int(params.size() / (2 * size_t(nets.L)));
  for (int64_t a : act)
    TORCH_CHECK(a >= 0 && a < kNumActivations, "bpnn_nets: unknown activation code ", a);
  nets.act = act;
  const int L = nets.L;
  nets.n.assign(L + 1, 0);
  nets.n[0] = int(D);
  for (int k = 0; k < L; ++k) {
    const auto& W = params[2 * k];
    TORCH_CHECK(W.dim() == 2, "bpnn_nets: weight of layer ", k + 1, " must be 2-D");
    nets.n[k + 1] = int(W.size(0));
  }
  TORCH_CHECK(nets.n[L] == 1, "bpnn_nets: the last layer must have one output");
  nets.p.assign(L, 0);
  for (int k = 0; k < L; ++k) nets.p[k] = pad4(nets.n[k]);
  nets.pmax = *std::max_element(nets.p.begin(), nets.p.end());
  int64_t off = 0, goff = 0;
  for (int k = 1; k < L; ++k) {
    const int64_t po = nets.p[k], pi = nets.p[k - 1];
    nets.w_off.push_back(off);
    nets.wt_off.push_back(off + po * pi);
    nets.b_off.push_back(off + 2 * po * pi);
    off += 2 * po * pi + po;
    nets.gw_off.push_back(goff);
    nets.gb_off.push_back(goff + po * pi);
    goff += po * pi + po;
  }
  nets.wl_off = off;
  nets.bl_off = off + nets.p[L - 1];
  nets.per_species = (off + nets.p[L - 1] + 1 + 3) / 4 * 4;
  nets.gwl_off = goff;
  nets.gbl_off = goff + nets.p[L - 1];
  nets.grad_per_species = (goff + nets.p[L - 1] + 1 + 3) / 4 * 4;
  for (int k = 1; k < L; ++k) nets.save_row += 4 * int64_t(nets.p[k]);
  nets.data.assign(size_t(nets.T) * size_t(nets.per_species), 0.0);
  for (int t = 0; t < nets.T; ++t) {
    double* blk = nets.data.data() + t * nets.per_species;
    for (int k = 0; k < L; ++k) {
      const int64_t no = nets.n[k + 1], ni = nets.n[k];
      const auto& W = params[size_t(t) * 2 * L + 2 * k];
      const auto& b = params[size_t(t) * 2 * L + 2 * k + 1];
      TORCH_CHECK(W.dim() == 2 && W.size(0) == no && W.size(1) == ni,
                  "bpnn_nets: weight of layer ", k + 1, " of species ", t, " has shape ", W.sizes(),
                  ", expected [", no, ", ", ni, "] (all species share one architecture)");
      TORCH_CHECK(b.dim() == 1 && b.size(0) == no, "bpnn_nets: bias of layer ", k + 1,
                  " of species ", t, " has shape ", b.sizes(), ", expected [", no, "]");
      TORCH_CHECK(W.scalar_type() == dtype && b.scalar_type() == dtype,
                  "bpnn_nets: parameters must have the dtype of x");
      TORCH_CHECK(W.device().is_cpu() && b.device().is_cpu(), "bpnn_nets: CPU tensors expected");
      TORCH_CHECK(W.is_contiguous() && b.is_contiguous(), "bpnn_nets: parameters must be contiguous");
      AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "bpnn_nets_pack", [&] {
        const scalar_t* w = W.data_ptr<scalar_t>();
        const scalar_t* bs = b.data_ptr<scalar_t>();
        if (k + 1 < L) {
          const int64_t po = nets.p[k + 1], pi = nets.p[k];
          double* wp = blk + nets.w_off[k];
          double* wtp = blk + nets.wt_off[k];
          double* bp = blk + nets.b_off[k];
          for (int64_t o = 0; o < no; ++o) {
            for (int64_t j = 0; j < ni; ++j) {
              wp[o * pi + j] = static_cast<double>(w[o * ni + j]);
              wtp[j * po + o] = static_cast<double>(w[o * ni + j]);
            }
            bp[o] = static_cast<double>(bs[o]);
          }
        } else {
          for (int64_t j = 0; j < ni; ++j) blk[nets.wl_off + j] = static_cast<double>(w[j]);
          blk[nets.bl_off] = static_cast<double>(bs[0]);
        }
      });
    }
  }
  return nets;
}

// ---- 4-double vectors (GCC/Clang vector extension: AVX2 in the AVX2 clone, SSE2 pairs else) ----
typedef double v4 __attribute__((vector_size(32)));
typedef double v4u __attribute__((vector_size(32), aligned(8), may_alias));
typedef long long v4i __attribute__((vector_size(32)));
#define DM_INLINE inline __attribute__((always_inline))
DM_INLINE v4 ld4(const double* p) { return *reinterpret_cast<const v4u*>(p); }
DM_INLINE void st4(double* p, v4 v) { *reinterpret_cast<v4u*>(p) = v; }
DM_INLINE v4 splat4(double s) { return v4{s, s, s, s}; }

// tanh of four doubles, branch-free, accurate to a few ulp (tested against torch.tanh):
// tanh|x| = q / (q + 2) with q = expm1(2|x|); q by its Taylor series below 0.3466 (degree 14,
// truncation < 1e-18 relative), above as exp(y) - 1 with exp(y) = 2^k exp(r), k = round(y / ln 2),
// |r| <= ln(2) / 2 by Taylor to degree 13 (truncation 4e-18); 2 |x| is clamped at 44, where
// tanh rounds to 1.  (torch's tanh on this machine goes through MKL's generic VML path and was
// a third of the networks' time.)
DM_INLINE v4 tanh4(v4 x) {
  const v4 ax = x < 0.0 ? -x : x;
  v4 y = 2.0 * ax;
  y = y > 44.0 ? splat4(44.0) : y;  // (NaN stays NaN)
  // small arguments: expm1(y) = y (1 + y/2 + y^2/6 + ...)
  v4 ps = splat4(1.0 / 87178291200.0);  // 1/14!
  const double inv_fact[14] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
                               1.0 / 362880.0, 1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0,
                               1.0 / 24.0, 1.0 / 6.0, 1.0 / 2.0, 1.0, 0.0};
  for (int i = 0; i < 13; ++i) ps = ps * y + inv_fact[i];  // ... + 1/1!
  const v4 q_small = ps * y;
  // larger arguments: exp(y) - 1
  const double magic = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to an integer
  const v4 t = y * 1.4426950408889634 + magic;
  const v4 kd = t - magic;
  const v4 r = (y - kd * 6.93147180369123816490e-01) - kd * 1.90821492927058770002e-10;
  v4 pe = splat4(1.0 / 6227020800.0);  // 1/13!
  const double inv_fact_e[13] = {1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0,
                                 1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0,
                                 1.0 / 6.0, 1.0 / 2.0, 1.0, 1.0};
  for (int i = 0; i < 13; ++i) pe = pe * r + inv_fact_e[i];
  v4i ti;
  __builtin_memcpy(&ti, &t, sizeof(ti));
  v4i mi;
  __builtin_memcpy(&mi, &magic, sizeof(double));
  const v4i ki = ti - v4i{mi[0], mi[0], mi[0], mi[0]};
  const v4i bits = (ki + 1023) << 52;
  v4 two_k;
  __builtin_memcpy(&two_k, &bits, sizeof(two_k));
  const v4 q_large = pe * two_k - 1.0;
  const v4 q = y < 0.3466 ? q_small : q_large;
  const v4 th = q / (q + 2.0);
  return x < 0.0 ? -th : th;
}

// n (a padded width: a multiple of 4) doubles from src to dst in 4-double vectors: the per-atom
// rows of the saved intermediates are a dozen doubles each, and std::copy made each a libc
// memmove call
DM_INLINE void copy4(const double* src, int64_t n, double* dst) {
  for (int64_t k = 0; k < n; k += 4) st4(dst + k, ld4(src + k));
}

// ---- activations of a whole block of atoms at once ----
// tanh runs on 4-double vectors (tanh4); the other activations go through torch's vectorised
// CPU kernels (at::sigmoid_out, at::softplus_out on the block's contiguous pre-activations): a
// scalar libm call per neuron and atom costs more than all the products of the network.  The derivatives
// follow from the values in plain loops.
DM_NETS_CLONES
void block_activation(int64_t kind, const double* a, double* h, double* d1, double* d2, int64_t n) {
  if (n == 0) return;
  const auto opts = torch::TensorOptions().dtype(torch::kDouble);
  const auto A = torch::from_blob(const_cast<double*>(a), {n}, opts);
  auto H = torch::from_blob(h, {n}, opts);
  switch (kind) {
    case kTanh: {
      int64_t i = 0;
      for (; i + 4 <= n; i += 4) st4(h + i, tanh4(ld4(a + i)));
      if (i < n) {
        double tmp[4] = {0.0, 0.0, 0.0, 0.0};
        for (int64_t q = i; q < n; ++q) tmp[q - i] = a[q];
        const v4 th = tanh4(ld4(tmp));
        for (int64_t q = i; q < n; ++q) h[q] = th[q - i];
      }
      for (int64_t i = 0; i < n; ++i) d1[i] = 1.0 - h[i] * h[i];
      if (d2)
        for (int64_t i = 0; i < n; ++i) d2[i] = -2.0 * h[i] * d1[i];
      return;
    }
    case kSigmoid: {
      at::sigmoid_out(H, A);
      for (int64_t i = 0; i < n; ++i) d1[i] = h[i] * (1.0 - h[i]);
      if (d2)
        for (int64_t i = 0; i < n; ++i) d2[i] = d1[i] * (1.0 - 2.0 * h[i]);
      return;
    }
    case kLinear: {
      for (int64_t i = 0; i < n; ++i) {
        h[i] = a[i];
        d1[i] = 1.0;
      }
      if (d2) std::fill(d2, d2 + n, 0.0);
      return;
    }
    case kSoftplus: {  // torch.nn.Softplus(beta=1, threshold=20): linear above 20
      at::softplus_out(H, A, 1.0, 20.0);
      auto S = torch::from_blob(d1, {n}, opts);
      at::sigmoid_out(S, A);  // d1 = sigmoid(a) below the threshold
      for (int64_t i = 0; i < n; ++i) {
        const double s = d1[i];
        const bool lin = a[i] > 20.0;
        if (d2) d2[i] = lin ? 0.0 : s * (1.0 - s);
        d1[i] = lin ? 1.0 : s;
      }
      return;
    }
    case kSilu:
    default: {  // h = a s(a)
      auto S = torch::from_blob(d1, {n}, opts);
      at::sigmoid_out(S, A);
      for (int64_t i = 0; i < n; ++i) {
        const double s = d1[i], x = a[i];
        h[i] = x * s;
        if (d2) d2[i] = s * (1.0 - s) * (2.0 + x * (1.0 - 2.0 * s));
        d1[i] = s * (1.0 + x * (1.0 - s));
      }
      return;
    }
  }
}

// ---- small matrix products on 4-double vectors ----

// C[m, 4 NV] (+)= op(A)[m, kk] B[kk, 4 NV]; op(A)(i, l) = TA ? A[l lda + i] : A[i lda + l].
// Tiles of 4 rows x NV vectors stay in registers across the kk loop.
template <int NV, bool TA>
DM_INLINE void mm_cols(int64_t m, int64_t kk, const double* A, int64_t lda, const double* B,
                       int64_t ldb, double* C, int64_t ldc, bool acc) {
  int64_t r = 0;
  for (; r + 4 <= m; r += 4) {
    v4 c[4][NV];
    for (int i = 0; i < 4; ++i)
      for (int v = 0; v < NV; ++v) c[i][v] = acc ? ld4(C + (r + i) * ldc + 4 * v) : v4{0, 0, 0, 0};
    for (int64_t l = 0; l < kk; ++l) {
      v4 b[NV];
      for (int v = 0; v < NV; ++v) b[v] = ld4(B + l * ldb + 4 * v);
      for (int i = 0; i < 4; ++i) {
        const double a = TA ? A[l * lda + r + i] : A[(r + i) * lda + l];
        const v4 av = {a, a, a, a};
        for (int v = 0; v < NV; ++v) c[i][v] += av * b[v];
      }
    }
    for (int i = 0; i < 4; ++i)
      for (int v = 0; v < NV; ++v) st4(C + (r + i) * ldc + 4 * v, c[i][v]);
  }
  for (; r < m; ++r) {
    v4 c[NV];
    for (int v = 0; v < NV; ++v) c[v] = acc ? ld4(C + r * ldc + 4 * v) : v4{0, 0, 0, 0};
    for (int64_t l = 0; l < kk; ++l) {
      const double a = TA ? A[l * lda + r] : A[r * lda + l];
      const v4 av = {a, a, a, a};
      for (int v = 0; v < NV; ++v) c[v] += av * ld4(B + l * ldb + 4 * v);
    }
    for (int v = 0; v < NV; ++v) st4(C + r * ldc + 4 * v, c[v]);
  }
}

// C[m, n] (+)= op(A)[m, kk] B[kk, n], n a multiple of 4
template <bool TA>
DM_INLINE void mm(int64_t m, int64_t n, int64_t kk, const double* A, int64_t lda, const double* B,
                  int64_t ldb, double* C, int64_t ldc, bool acc) {
  for (int64_t c0 = 0; c0 < n; c0 += 12) {
    const int64_t nv = std::min<int64_t>(3, (n - c0) / 4);
    if (nv == 3) mm_cols<3, TA>(m, kk, A, lda, B + c0, ldb, C + c0, ldc, acc);
    else if (nv == 2) mm_cols<2, TA>(m, kk, A, lda, B + c0, ldb, C + c0, ldc, acc);
    else mm_cols<1, TA>(m, kk, A, lda, B + c0, ldb, C + c0, ldc, acc);
  }
}

// Per-thread scratch for a block of up to ``cap`` atoms (rows ordered by species): for each
// layer k the arrays [cap, p_k] of h_k, the pre-activation, s'_k, s''_k, the g-chain g_k, its
// cotangent u_k and the g-chain's a_k cotangent; three temporaries [cap, pmax].
struct Scratch {
  int L, pmax;
  int64_t cap;
  double* buf;
  std::vector<int64_t> perm;
  std::vector<int64_t> start;
  Scratch(const Nets& nets, int64_t cap_)
      : L(nets.L), pmax(nets.pmax), cap(cap_), buf(nullptr), perm(cap_), start(nets.T + 1) {
    // per-thread storage kept between calls (every entry is written before it is read)
    thread_local std::vector<double> storage;
    const size_t need = size_t(10) * (nets.L + 1) * size_t(cap_) * nets.pmax;
    if (storage.size() < need) storage.resize(need);
    buf = storage.data();
  }
  double* field(int f, int k) { return buf + (size_t(f) * (L + 1) + k) * cap * pmax; }
  double* h(int k) { return field(0, k); }
  double* a(int k) { return field(1, k); }
  double* d1(int k) { return field(2, k); }
  double* d2(int k) { return field(3, k); }
  double* g(int k) { return field(4, k); }
  double* u(int k) { return field(5, k); }
  double* ag(int k) { return field(6, k); }
  double* t(int i) { return field(7 + i, 0); }
};

struct BlockIO {            // one block's inputs and outputs (global atom arrays, double)
  const double* x;          // [N, D]
  const int64_t* sp;        // [N]
  const double* yb;         // [N] or null (backward)
  const double* ub;         // [N, D] or null (backward)
  double* y;                // [N] or null (forward)
  double* dydx;             // [N, D] or null (forward)
  double* xbar;             // [N, D] or null (backward)
  double* grads;            // [T, grad_per_species] of this block (backward) or null
  double* save = nullptr;        // [N, save_row]: the forward writes its intermediates, or null
  const double* load = nullptr;  // [N, save_row]: the backward reads them instead of recomputing
};

// The saved intermediates, one row per atom (row a of [N, save_row]): for k = 1..L-1 the vectors
// h_k, s'_k, s''_k, g_k [p_k] one after the other.  Per-atom rows let a forward cut the atoms
// into blocks other than the backward's (the pipelined force operator runs the networks on small
// blocks).  fn(k, scratch offset of block row r, h, s', s'', g of atom a0 + perm[r], p_k).
template <typename Ptr, typename Fn>
DM_INLINE void for_saved(const Nets& nets, Ptr base, int64_t a0, int64_t nb, const std::vector<int64_t>& perm,
                         Fn fn) {
  for (int64_t r = 0; r < nb; ++r) {
    auto* q = base + (a0 + perm[r]) * nets.save_row;
    for (int k = 1; k < nets.L; ++k) {
      const int64_t pk = nets.p[k];
      fn(k, r * pk, q, q + pk, q + 2 * pk, q + 3 * pk, pk);
      q += 4 * pk;
    }
  }
}

// One block of atoms a0 .. a0 + nb - 1: forward (y, dy/dx) or backward (weight gradients into
// io.grads, x cotangent), with every product a species-wise matrix product on the block.
DM_NETS_CLONES
void process_block(const Nets& nets, const BlockIO& io, int64_t a0, int64_t nb, bool backward, Scratch& S) {
  const int L = nets.L, T = nets.T;
  const int D = nets.n[0];
  const std::vector<int>& p = nets.p;
  // rows ordered by species (stable): row r is atom a0 + perm[r]
  std::vector<int64_t>& st = S.start;
  std::fill(st.begin(), st.end(), 0);
  for (int64_t b = 0; b < nb; ++b) ++st[io.sp[a0 + b] + 1];
  for (int t = 0; t < T; ++t) st[t + 1] += st[t];
  {
    std::vector<int64_t> fill(st.begin(), st.end() - 1);
    for (int64_t b = 0; b < nb; ++b) S.perm[fill[io.sp[a0 + b]]++] = b;
  }
  const bool with_g = backward ? io.ub != nullptr : io.dydx != nullptr;
  const bool second = backward && io.ub != nullptr;
  const bool load = backward && io.load != nullptr;
  // h_0: the rows of x, zero-padded
  {
    double* h0 = S.h(0);
    for (int64_t r = 0; r < nb; ++r) {
      const double* xr = io.x + (a0 + S.perm[r]) * D;
      double* hr = h0 + r * p[0];
      for (int j = 0; j < D; ++j) hr[j] = xr[j];
      for (int j = D; j < p[0]; ++j) hr[j] = 0.0;
    }
  }
  if (load) {
    for_saved(nets, io.load, a0, nb, S.perm, [&](int k, int64_t o, const double* h, const double* d1,
                                                 const double* d2, const double* g, int64_t n) {
      copy4(h, n, S.h(k) + o);
      copy4(d1, n, S.d1(k) + o);
      copy4(d2, n, S.d2(k) + o);
      copy4(g, n, S.g(k) + o);
    });
  }
  // hidden layers
  for (int k = 1; k < L && !load; ++k) {
    const int po = p[k], pi = p[k - 1];
    double* a = S.a(k);
    for (int t = 0; t < T; ++t) {
      const int64_t r0 = st[t], m = st[t + 1] - r0;
      if (m == 0) continue;
      const double* blk = nets.species_block(t);
      const double* bias = blk + nets.b_off[k - 1];
      double* at = a + r0 * po;
      for (int64_t r = 0; r < m; ++r)
        for (int o = 0; o < po; ++o) at[r * po + o] = bias[o];
      mm<false>(m, po, pi, S.h(k - 1) + r0 * pi, pi, blk + nets.wt_off[k - 1], po, at, po, true);
    }
    block_activation(nets.act[k - 1], a, S.h(k), S.d1(k), (second || io.save) ? S.d2(k) : nullptr, nb * po);
  }
  const int pl = p[L - 1];
  if (!backward && io.y != nullptr) {
    const double* hl = S.h(L - 1);
    for (int64_t r = 0; r < nb; ++r) {
      const double* blk = nets.species_block(io.sp[a0 + S.perm[r]]);
      const double* wl = blk + nets.wl_off;
      double s = blk[nets.bl_off];
      for (int j = 0; j < pl; ++j) s += wl[j] * hl[r * pl + j];
      io.y[a0 + S.perm[r]] = s;
    }
  }
  if (with_g && !load) {  // g-chain: g_{L-1} = w_L, g_{k-1} = (g_k * s'_k) W_k
    double* gl = S.g(L - 1);
    for (int t = 0; t < T; ++t) {
      const double* wl = nets.species_block(t) + nets.wl_off;
      for (int64_t r = st[t]; r < st[t + 1]; ++r)
        for (int j = 0; j < pl; ++j) gl[r * pl + j] = wl[j];
    }
    for (int k = L - 1; k >= 1; --k) {
      const int po = p[k], pi = p[k - 1];
      double* dk = S.t(0);
      const double* gk = S.g(k);
      const double* d1 = S.d1(k);
      for (int64_t q = 0; q < nb * po; ++q) dk[q] = gk[q] * d1[q];
      for (int t = 0; t < T; ++t) {
        const int64_t r0 = st[t], m = st[t + 1] - r0;
        if (m == 0) continue;
        mm<false>(m, pi, po, dk + r0 * po, po, nets.species_block(t) + nets.w_off[k - 1], pi,
                  S.g(k - 1) + r0 * pi, pi, false);
      }
    }
    if (!backward) {
      const double* g0 = S.g(0);
      for (int64_t r = 0; r < nb; ++r) {
        double* out = io.dydx + (a0 + S.perm[r]) * D;
        for (int j = 0; j < D; ++j) out[j] = g0[r * p[0] + j];
      }
    }
  }
  if (!backward) {
    if (io.save != nullptr && with_g) {
      for_saved(nets, io.save, a0, nb, S.perm, [&](int k, int64_t o, double* h, double* d1, double* d2,
                                                   double* g, int64_t n) {
        copy4(S.h(k) + o, n, h);
        copy4(S.d1(k) + o, n, d1);
        copy4(S.d2(k) + o, n, d2);
        copy4(S.g(k) + o, n, g);
      });
    }
    return;
  }

  const int64_t G = nets.grad_per_species;
  if (io.ub != nullptr) {  // up the g-chain
    double* u0 = S.u(0);
    for (int64_t r = 0; r < nb; ++r) {
      const double* ur = io.ub + (a0 + S.perm[r]) * D;
      for (int j = 0; j < D; ++j) u0[r * p[0] + j] = ur[j];
      for (int j = D; j < p[0]; ++j) u0[r * p[0] + j] = 0.0;
    }
    for (int k = 1; k < L; ++k) {
      const int po = p[k], pi = p[k - 1];
      double* dbar = S.t(0);
      for (int t = 0; t < T; ++t) {
        const int64_t r0 = st[t], m = st[t + 1] - r0;
        if (m == 0) continue;
        mm<false>(m, po, pi, S.u(k - 1) + r0 * pi, pi, nets.species_block(t) + nets.wt_off[k - 1], po,
                  dbar + r0 * po, po, false);
      }
      const double* gk = S.g(k);
      const double* d1 = S.d1(k);
      const double* d2 = S.d2(k);
      double* ag = S.ag(k);
      double* uk = S.u(k);
      for (int64_t q = 0; q < nb * po; ++q) {
        ag[q] = dbar[q] * gk[q] * d2[q];
        uk[q] = dbar[q] * d1[q];
      }
    }
  }
  // last layer: y = w_L . h_{L-1} + b_L (and g_{L-1} = w_L)
  double* hbar = S.t(1);
  for (int t = 0; t < T; ++t) {
    double* gw = io.grads + t * G + nets.gwl_off;
    const double* wl = nets.species_block(t) + nets.wl_off;
    double sb = 0.0;
    for (int64_t r = st[t]; r < st[t + 1]; ++r) {
      const double yb = io.yb ? io.yb[a0 + S.perm[r]] : 0.0;
      const double* hr = S.h(L - 1) + r * pl;
      for (int j = 0; j < pl; ++j) gw[j] += yb * hr[j];
      if (io.ub != nullptr) {
        const double* ur = S.u(L - 1) + r * pl;
        for (int j = 0; j < pl; ++j) gw[j] += ur[j];
      }
      sb += yb;
      for (int j = 0; j < pl; ++j) hbar[r * pl + j] = yb * wl[j];
    }
    io.grads[t * G + nets.gbl_off] += sb;
  }
  for (int k = L - 1; k >= 1; --k) {  // down the y-chain, with the g-chain's a_k terms
    const int po = p[k], pi = p[k - 1];
    double* abar = S.t(0);
    const double* d1 = S.d1(k);
    if (io.ub != nullptr) {
      const double* ag = S.ag(k);
      for (int64_t q = 0; q < nb * po; ++q) abar[q] = hbar[q] * d1[q] + ag[q];
    } else {
      for (int64_t q = 0; q < nb * po; ++q) abar[q] = hbar[q] * d1[q];
    }
    double* dk = S.t(2);
    if (io.ub != nullptr) {
      const double* gk = S.g(k);
      for (int64_t q = 0; q < nb * po; ++q) dk[q] = gk[q] * d1[q];
    }
    for (int t = 0; t < T; ++t) {
      const int64_t r0 = st[t], m = st[t + 1] - r0;
      if (m == 0) continue;
      double* gw = io.grads + t * G + nets.gw_off[k - 1];
      double* gb = io.grads + t * G + nets.gb_off[k - 1];
      // W_k gets abar_k^T h_{k-1} (+ d_k^T u_{k-1}), summed over the species' rows
      mm<true>(po, pi, m, abar + r0 * po, po, S.h(k - 1) + r0 * pi, pi, gw, pi, true);
      if (io.ub != nullptr) mm<true>(po, pi, m, dk + r0 * po, po, S.u(k - 1) + r0 * pi, pi, gw, pi, true);
      for (int64_t r = r0; r < r0 + m; ++r)
        for (int o = 0; o < po; ++o) gb[o] += abar[r * po + o];
      if (k > 1 || io.xbar != nullptr)  // hbar_{k-1} = abar_k W_k (hbar_k has been consumed)
        mm<false>(m, pi, po, abar + r0 * po, po, nets.species_block(t) + nets.w_off[k - 1], pi,
                  hbar + r0 * pi, pi, false);
    }
  }
  if (io.xbar != nullptr) {
    for (int64_t r = 0; r < nb; ++r) {
      double* out = io.xbar + (a0 + S.perm[r]) * D;
      for (int j = 0; j < D; ++j) out[j] = hbar[r * p[0] + j];
    }
  }
}

// Atoms are processed in blocks of kBlockAtoms (the unit of the vectorised activations, of the
// parallel loop and of the deterministic weight-gradient sums); with very many atoms the blocks
// grow so that there are at most kMaxBlocks partial gradient buffers.
constexpr int64_t kBlockAtoms = 128;
constexpr int64_t kMaxBlocks = 256;

int64_t block_size(int64_t N) {
  return std::max<int64_t>(kBlockAtoms, (N + kMaxBlocks - 1) / kMaxBlocks);
}

// ---- drivers ----

void forward_impl(const Nets& nets, const double* xp, const int64_t* sp, int64_t N, int64_t D,
                  double* yp, double* gp, double* save = nullptr) {
  (void)D;
  const int64_t block = block_size(N);
  const int64_t n_blocks = (N + block - 1) / block;
  const BlockIO io{xp, sp, nullptr, nullptr, yp, gp, nullptr, nullptr, save, nullptr};
#pragma omp parallel num_threads(n_blocks > 1 ? nets_threads() : 1)
  {
    Scratch S(nets, std::min(block, N));
#pragma omp for schedule(dynamic, 1)
    for (int64_t bi = 0; bi < n_blocks; ++bi) {
      const int64_t a0 = bi * block;
      process_block(nets, io, a0, std::min(N, a0 + block) - a0, false, S);
    }
  }
}

void backward_impl(const Nets& nets, const double* xp, const int64_t* sp, int64_t N, int64_t D,
                   const double* yb, const double* ub, double* xb, int64_t block,
                   int64_t n_blocks, double* partial, double* total, const double* load = nullptr) {
  (void)D;
  const int64_t G = nets.grad_per_species, T = nets.T;
#pragma omp parallel num_threads(n_blocks > 1 ? nets_threads() : 1)
  {
    Scratch S(nets, std::min(block, N));
#pragma omp for schedule(dynamic, 1)
    for (int64_t bi = 0; bi < n_blocks; ++bi) {
      const BlockIO io{xp, sp, yb, ub, nullptr, nullptr, xb, partial + bi * T * G, nullptr, load};
      const int64_t a0 = bi * block;
      process_block(nets, io, a0, std::min(N, a0 + block) - a0, true, S);
    }
#pragma omp for schedule(static)
    for (int64_t q = 0; q < T * G; ++q) {
      double s = 0.0;
      for (int64_t b = 0; b < n_blocks; ++b) s += partial[b * T * G + q];
      total[q] = s;
    }
  }
}

void check_common(const torch::Tensor& x, const torch::Tensor& species) {
  TORCH_CHECK(x.dim() == 2, "bpnn_nets: x must be [N, D], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kDouble,
              "bpnn_nets: x must be float32 or float64");
  TORCH_CHECK(x.device().is_cpu() && species.device().is_cpu(), "bpnn_nets: CPU tensors expected");
  TORCH_CHECK(species.dim() == 1 && species.size(0) == x.size(0) &&
                  species.scalar_type() == torch::kLong,
              "bpnn_nets: species must be int64 [N]");
}

void check_species(const int64_t* sp, int64_t N, int T) {
  for (int64_t a = 0; a < N; ++a)
    TORCH_CHECK(sp[a] >= 0 && sp[a] < T, "bpnn_nets: atom ", a, " has species index ", sp[a],
                ", the model has ", T, " networks");
}

// The checked, packed inputs of both operators.  All arithmetic is in double: a float32 network
// is converted on the way in and out.
struct Inputs {
  torch::Tensor x, xd, species;
  Nets nets;
  int64_t N = 0, D = 0;
  const int64_t* sp = nullptr;
};

Inputs prepare(const torch::Tensor& x_in, const torch::Tensor& species_in,
               const std::vector<torch::Tensor>& params, const std::vector<int64_t>& activations) {
  check_common(x_in, species_in);
  Inputs in;
  in.x = x_in.contiguous();
  in.species = species_in.contiguous();
  in.N = in.x.size(0);
  in.D = in.x.size(1);
  in.nets = pack_nets(params, activations, in.D, in.x.scalar_type());
  in.sp = in.species.data_ptr<int64_t>();
  check_species(in.sp, in.N, in.nets.T);
  in.xd = in.x.to(torch::kDouble).contiguous();
  return in;
}

std::tuple<torch::Tensor, torch::Tensor> nets_forward_cpu(const torch::Tensor& x_in,
                                                          const torch::Tensor& species_in,
                                                          std::vector<torch::Tensor> params,
                                                          std::vector<int64_t> activations,
                                                          bool with_grad, torch::Tensor* saved = nullptr) {
  const Inputs in = prepare(x_in, species_in, params, activations);
  const int64_t N = in.N, D = in.D;
  const auto dopt = in.xd.options();
  auto y = torch::empty({N}, dopt);
  auto dydx = with_grad ? torch::empty({N, D}, dopt) : torch::empty({0}, dopt);
  if (saved != nullptr) *saved = torch::empty({with_grad ? N : 0, in.nets.save_row}, dopt);
  forward_impl(in.nets, in.xd.data_ptr<double>(), in.sp, N, D, y.data_ptr<double>(),
               with_grad ? dydx.data_ptr<double>() : nullptr,
               (saved != nullptr && with_grad) ? saved->data_ptr<double>() : nullptr);
  y = y.to(in.x.scalar_type());
  dydx = dydx.to(in.x.scalar_type());
  return {y, dydx};
}

std::vector<torch::Tensor> nets_backward_cpu(const torch::Tensor& x_in, const torch::Tensor& species_in,
                                             std::vector<torch::Tensor> params,
                                             std::vector<int64_t> activations,
                                             const c10::optional<torch::Tensor>& ybar_in,
                                             const c10::optional<torch::Tensor>& ubar_in, bool need_x,
                                             bool flat = false, const torch::Tensor* saved = nullptr) {
  const Inputs in = prepare(x_in, species_in, params, activations);
  const double* load = nullptr;
  if (saved != nullptr && saved->defined() && saved->numel() > 0) {
    TORCH_CHECK(saved->dim() == 2 && saved->size(0) == in.N && saved->size(1) == in.nets.save_row &&
                    saved->scalar_type() == torch::kDouble && saved->is_contiguous(),
                "bpnn_nets_backward: the saved intermediates must be the float64 [N, ", in.nets.save_row,
                "] tensor of the forward with these networks, got ", saved->sizes());
    load = saved->data_ptr<double>();
  }
  const torch::Tensor& x = in.x;
  const Nets& nets = in.nets;
  const int64_t N = in.N, D = in.D;
  const bool has_y = ybar_in.has_value() && ybar_in->defined();
  const bool has_u = ubar_in.has_value() && ubar_in->defined();
  torch::Tensor ybar, ubar;
  if (has_y) {
    TORCH_CHECK(ybar_in->numel() == N, "bpnn_nets_backward: ybar must have N entries");
    ybar = ybar_in->to(torch::kDouble).contiguous();
  }
  if (has_u) {
    TORCH_CHECK(ubar_in->dim() == 2 && ubar_in->size(0) == N && ubar_in->size(1) == D,
                "bpnn_nets_backward: ubar must be [N, D]");
    ubar = ubar_in->to(torch::kDouble).contiguous();
  }
  auto xbar = need_x ? torch::empty({N, D}, in.xd.options()) : torch::empty({0}, x.options());
  const int64_t G = nets.grad_per_species, T = nets.T;
  const int64_t block = block_size(N);
  const int64_t n_blocks = std::max<int64_t>(1, (N + block - 1) / block);
  std::vector<double> partial(size_t(n_blocks) * size_t(T * G), 0.0);
  std::vector<double> total(size_t(T * G), 0.0);
  backward_impl(nets, in.xd.data_ptr<double>(), in.sp, N, D, has_y ? ybar.data_ptr<double>() : nullptr,
                has_u ? ubar.data_ptr<double>() : nullptr, need_x ? xbar.data_ptr<double>() : nullptr,
                block, n_blocks, partial.data(), total.data(), load);
  if (need_x) xbar = xbar.to(x.scalar_type());
  std::vector<torch::Tensor> out;
  out.reserve(params.size() + 1);
  // all parameter gradients in one tensor, in parameter order (the FlatParameters layout);
  // per parameter, views of it
  int64_t total_numel = 0;
  for (const auto& q : params) total_numel += q.numel();
  auto gf = torch::empty({total_numel}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bpnn_nets_grads", [&] {
    scalar_t* pf = gf.data_ptr<scalar_t>();
    for (int64_t t = 0; t < T; ++t) {
      for (int k = 0; k < nets.L; ++k) {
        const int64_t no = nets.n[k + 1], ni = nets.n[k];
        const bool last = k + 1 == nets.L;
        const int64_t pi = nets.p[k];
        const double* gwp = total.data() + t * G + (last ? nets.gwl_off : nets.gw_off[k]);
        const double* gbp = total.data() + t * G + (last ? nets.gbl_off : nets.gb_off[k]);
        for (int64_t o = 0; o < no; ++o)
          for (int64_t j = 0; j < ni; ++j) *pf++ = static_cast<scalar_t>(gwp[o * pi + j]);
        for (int64_t o = 0; o < no; ++o) *pf++ = static_cast<scalar_t>(gbp[o]);
      }
    }
  });
  if (flat) {
    out.push_back(gf);
  } else {
    int64_t off = 0;
    for (const auto& q : params) {
      out.push_back(gf.narrow(0, off, q.numel()).view(q.sizes()));
      off += q.numel();
    }
  }
  out.push_back(xbar);
  return out;
}

}  // namespace

// the operators bpnn_nets_forward and bpnn_nets_backward (one gradient tensor per parameter)
std::tuple<torch::Tensor, torch::Tensor> nets_forward_op(const torch::Tensor& x, const torch::Tensor& species,
                                                         std::vector<torch::Tensor> params,
                                                         std::vector<int64_t> activations, bool with_grad) {
  return nets_forward_cpu(x, species, std::move(params), std::move(activations), with_grad, nullptr);
}


std::vector<torch::Tensor> nets_backward_op(const torch::Tensor& x, const torch::Tensor& species,
                                            std::vector<torch::Tensor> params, std::vector<int64_t> activations,
                                            const c10::optional<torch::Tensor>& ybar,
                                            const c10::optional<torch::Tensor>& ubar, bool need_x) {
  return nets_backward_cpu(x, species, std::move(params), std::move(activations), ybar, ubar, need_x, false);
}

// ---- block-by-block forward for the pipelined force operator (cpu_ops.h) ----
struct NetsForward::Impl {
  Nets nets;
};

NetsForward::NetsForward(const std::vector<torch::Tensor>& params, const std::vector<int64_t>& activations,
                         int64_t D)
    : impl_(new Impl{pack_nets(params, activations, D, torch::kDouble)}) {}
NetsForward::~NetsForward() = default;
int64_t NetsForward::n_species() const { return impl_->nets.T; }
int64_t NetsForward::save_row() const { return impl_->nets.save_row; }

void NetsForward::run(const double* x, const int64_t* sp, int64_t a0, int64_t nb, double* y, double* dydx,
                      double* save) const {
  const BlockIO io{x, sp, nullptr, nullptr, y, dydx, nullptr, nullptr, save, nullptr};
  Scratch S(impl_->nets, nb);
  process_block(impl_->nets, io, a0, nb, false, S);
}

// entry points for the other CPU operators (cpu_ops.h)
std::tuple<torch::Tensor, torch::Tensor> bpnn_nets_forward_cpu(const torch::Tensor& x,
                                                               const torch::Tensor& species,
                                                               std::vector<torch::Tensor> params,
                                                               std::vector<int64_t> activations,
                                                               bool with_grad, torch::Tensor* saved) {
  return nets_forward_cpu(x, species, std::move(params), std::move(activations), with_grad, saved);
}

std::vector<torch::Tensor> bpnn_nets_backward_cpu(const torch::Tensor& x, const torch::Tensor& species,
                                                  std::vector<torch::Tensor> params,
                                                  std::vector<int64_t> activations,
                                                  const std::optional<torch::Tensor>& ybar,
                                                  const std::optional<torch::Tensor>& ubar, bool need_x,
                                                  bool flat, const torch::Tensor* saved) {
  return nets_backward_cpu(x, species, std::move(params), std::move(activations), ybar, ubar, need_x, flat,
                           saved);
}

}  // namespace distmlip

TORCH_LIBRARY_FRAGMENT(distmlip, m) {
  m.def("bpnn_nets_forward(Tensor x, Tensor species, Tensor[] params, int[] activations, bool with_grad)"
        " -> (Tensor, Tensor)");
  m.def("bpnn_nets_backward(Tensor x, Tensor species, Tensor[] params, int[] activations, Tensor? ybar,"
        " Tensor? ubar, bool need_x) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(distmlip, CPU, m) {
  m.impl("bpnn_nets_forward", &distmlip::nets_forward_op);
  m.impl("bpnn_nets_backward", &distmlip::nets_backward_op);
}
