// CUDA kernels of the fused aenet Chebyshev descriptor.  CUDA runtime only (no torch headers):
// compiles with `nvcc -c -std=c++17 csrc/chebyshev_cuda.cu`.  The torch side (allocation,
// streams, operator registration) is in chebyshev_cuda_glue.cpp.
//
// One thread per centre atom runs exactly the per-centre routines of chebyshev.h that the CPU
// operators run (so the CPU tests cover the arithmetic), with its scratch slot in a global buffer
// at the centre's pair offset (kSlotFields doubles per pair).  The neighbour side of the pair
// gradients is scattered by a second kernel with double atomics.  No host synchronisation:
// every launch goes to the caller's stream and errors are reported by cudaGetLastError.
#include <cuda_runtime.h>

#include <cstdint>

#include "chebyshev.h"

namespace distmlip {
namespace cheb {
namespace cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxDim = 4 * (kMaxOrder + 1);

inline unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>((n + kThreads - 1) / kThreads);
}

template <int NAC, typename scalar_t>
__global__ void forward_kernel(Problem<scalar_t> P, double* scratch, scalar_t* G) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= P.n_atoms) return;
  const int D = P.dim();
  double acc[kMaxDim];
  for (int d = 0; d < D; ++d) acc[d] = 0.0;
  const int64_t p0 = P.ptr[i];
  const int64_t cap = P.ptr[i + 1] - p0;
  centre_forward<NAC>(P, i, scratch + p0 * kSlotFields, cap, acc);
  for (int d = 0; d < D; ++d) G[i * D + d] = static_cast<scalar_t>(acc[d]);
}

template <int NAC, typename scalar_t>
__global__ void vjp_kernel(Problem<scalar_t> P, const scalar_t* g, double* scratch, double* gp,
                           double* dR) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= P.n_atoms) return;
  const int D = P.dim();
  const int64_t p0 = P.ptr[i];
  const int64_t cap = P.ptr[i + 1] - p0;
  centre_vjp<NAC>(P, i, g + i * D, scratch + p0 * kSlotFields, cap, gp, 0, dR + 3 * i);
}

template <int NAC, bool JVP, bool HVP, typename scalar_t>
__global__ void jvp_hvp_kernel(Problem<scalar_t> P, const scalar_t* g, const scalar_t* v,
                               double* scratch, scalar_t* jv, double* hp, double* hv) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= P.n_atoms) return;
  const int D = P.dim();
  double acc[kMaxDim];
  for (int d = 0; d < D; ++d) acc[d] = 0.0;
  const int64_t p0 = P.ptr[i];
  const int64_t cap = P.ptr[i + 1] - p0;
  centre_jvp_hvp<NAC, JVP, HVP>(P, i, g + i * D, v, scratch + p0 * kSlotFields, cap, acc, hp, 0,
                                HVP ? hv + 3 * i : nullptr);
  if (JVP) {
    for (int d = 0; d < D; ++d) jv[i * D + d] = static_cast<scalar_t>(acc[d]);
  }
}

// out[3 j + c] += pair_values[3 p + c] for every pair p with neighbour j = pj[p]
__global__ void scatter_neighbours_kernel(const int64_t* pj, int64_t n_pairs,
                                          const double* pair_values, double* out) {
  const int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= n_pairs) return;
  const int64_t j = pj[p];
  atomicAdd(out + 3 * j + 0, pair_values[3 * p + 0]);
  atomicAdd(out + 3 * j + 1, pair_values[3 * p + 1]);
  atomicAdd(out + 3 * j + 2, pair_values[3 * p + 2]);
}

}  // namespace

template <typename scalar_t>
cudaError_t launch_forward(const Problem<scalar_t>& P, double* scratch, scalar_t* G,
                           cudaStream_t stream) {
  if (P.n_atoms == 0) return cudaSuccess;
  const unsigned nb = blocks_for(P.n_atoms);
  DISTMLIP_DISPATCH_NA(P.n_a, NAC,
                       (forward_kernel<NAC, scalar_t><<<nb, kThreads, 0, stream>>>(P, scratch, G)));
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_vjp(const Problem<scalar_t>& P, const scalar_t* g, double* scratch, double* gp,
                       double* dR, cudaStream_t stream) {
  if (P.n_atoms == 0) return cudaSuccess;
  const unsigned nb = blocks_for(P.n_atoms);
  DISTMLIP_DISPATCH_NA(P.n_a, NAC,
                       (vjp_kernel<NAC, scalar_t><<<nb, kThreads, 0, stream>>>(P, g, scratch, gp, dR)));
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || P.n_pairs == 0) return err;
  scatter_neighbours_kernel<<<blocks_for(P.n_pairs), kThreads, 0, stream>>>(P.pj, P.n_pairs, gp, dR);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_jvp_hvp(const Problem<scalar_t>& P, const scalar_t* g, const scalar_t* v,
                           double* scratch, scalar_t* jv, double* hp, double* hv, bool need_jvp,
                           bool need_hvp, cudaStream_t stream) {
  if (P.n_atoms == 0 || (!need_jvp && !need_hvp)) return cudaSuccess;
  const unsigned nb = blocks_for(P.n_atoms);
  if (need_jvp && need_hvp) {
    DISTMLIP_DISPATCH_NA(P.n_a, NAC,
                         (jvp_hvp_kernel<NAC, true, true, scalar_t>
                          <<<nb, kThreads, 0, stream>>>(P, g, v, scratch, jv, hp, hv)));
  } else if (need_jvp) {
    DISTMLIP_DISPATCH_NA(P.n_a, NAC,
                         (jvp_hvp_kernel<NAC, true, false, scalar_t>
                          <<<nb, kThreads, 0, stream>>>(P, g, v, scratch, jv, hp, hv)));
  } else {
    DISTMLIP_DISPATCH_NA(P.n_a, NAC,
                         (jvp_hvp_kernel<NAC, false, true, scalar_t>
                          <<<nb, kThreads, 0, stream>>>(P, g, v, scratch, jv, hp, hv)));
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || !need_hvp || P.n_pairs == 0) return err;
  scatter_neighbours_kernel<<<blocks_for(P.n_pairs), kThreads, 0, stream>>>(P.pj, P.n_pairs, hp, hv);
  return cudaGetLastError();
}

template cudaError_t launch_forward<float>(const Problem<float>&, double*, float*, cudaStream_t);
template cudaError_t launch_forward<double>(const Problem<double>&, double*, double*, cudaStream_t);
template cudaError_t launch_vjp<float>(const Problem<float>&, const float*, double*, double*,
                                       double*, cudaStream_t);
template cudaError_t launch_vjp<double>(const Problem<double>&, const double*, double*, double*,
                                        double*, cudaStream_t);
template cudaError_t launch_jvp_hvp<float>(const Problem<float>&, const float*, const float*,
                                           double*, float*, double*, double*, bool, bool,
                                           cudaStream_t);
template cudaError_t launch_jvp_hvp<double>(const Problem<double>&, const double*, const double*,
                                            double*, double*, double*, double*, bool, bool,
                                            cudaStream_t);

}  // namespace cuda
}  // namespace cheb
}  // namespace distmlip
