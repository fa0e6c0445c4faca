// Torch glue of the CUDA Chebyshev kernels: registers the CUDA implementations of
// distmlip::chebyshev_{forward,backward,double_backward} (schemas in chebyshev_cpu.cpp).
// Compiled only when setup.py builds with CUDA (DISTMLIP_WITH_CUDA); the kernels themselves are
// in chebyshev_cuda.cu, which includes no torch header.
//
// No host synchronisation: outputs and scratch come from the caching allocator, kernels run on the
// current stream, and input values (species range, CSR consistency) are not checked on the GPU
// (the CPU operators check them).
#ifdef DISTMLIP_WITH_CUDA

#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>
#include <tuple>

#include "chebyshev.h"

namespace distmlip {

void chebyshev_check_inputs(const torch::Tensor& positions, const torch::Tensor& species,
                            const torch::Tensor& pair_ptr, const torch::Tensor& pair_j,
                            const torch::Tensor& pair_shift, const torch::Tensor& typespin,
                            double rc_r, int64_t n_r, double rc_a, int64_t n_a);

namespace {

template <typename scalar_t>
cheb::Problem<scalar_t> cuda_problem(const torch::Tensor& positions, const torch::Tensor& species,
                                     const torch::Tensor& pair_ptr, const torch::Tensor& pair_j,
                                     const torch::Tensor& pair_shift, const torch::Tensor& typespin,
                                     double rc_r, int64_t n_r, double rc_a, int64_t n_a) {
  cheb::Problem<scalar_t> P;
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
  return P;
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA launch failed: ", cudaGetErrorString(err));
}

torch::Tensor scratch_for(const torch::Tensor& positions, int64_t n_pairs) {
  return torch::empty({std::max<int64_t>(1, n_pairs) * cheb::kSlotFields},
                      positions.options().dtype(torch::kDouble));
}

}  // namespace

torch::Tensor chebyshev_forward_cuda(const torch::Tensor& positions, const torch::Tensor& species,
                                     const torch::Tensor& pair_ptr, const torch::Tensor& pair_j,
                                     const torch::Tensor& pair_shift,
                                     const torch::Tensor& typespin, double rc_r, int64_t n_r,
                                     double rc_a, int64_t n_a) {
  chebyshev_check_inputs(positions, species, pair_ptr, pair_j, pair_shift, typespin, rc_r, n_r,
                         rc_a, n_a);
  const c10::cuda::OptionalCUDAGuard guard(positions.device());
  const int64_t N = positions.size(0);
  const int D = cheb::descriptor_dim(int(n_r), int(n_a), typespin.size(0) > 1);
  auto G = torch::empty({N, D}, positions.options());
  auto scratch = scratch_for(positions, pair_j.size(0));
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(positions.scalar_type(), "chebyshev_forward_cuda", [&] {
    const auto P = cuda_problem<scalar_t>(positions, species, pair_ptr, pair_j, pair_shift,
                                          typespin, rc_r, n_r, rc_a, n_a);
    check_cuda(cheb::cuda::launch_forward<scalar_t>(P, scratch.data_ptr<double>(),
                                                    G.data_ptr<scalar_t>(), stream),
               "chebyshev_forward");
  });
  return G;
}

torch::Tensor chebyshev_backward_cuda(const torch::Tensor& grad_G, const torch::Tensor& positions,
                                      const torch::Tensor& species, const torch::Tensor& pair_ptr,
                                      const torch::Tensor& pair_j, const torch::Tensor& pair_shift,
                                      const torch::Tensor& typespin, double rc_r, int64_t n_r,
                                      double rc_a, int64_t n_a,
                                      const std::optional<torch::Tensor>& /*moments*/) {
  // moments (the CPU forward's angular moments) are not used by the CUDA kernels
  chebyshev_check_inputs(positions, species, pair_ptr, pair_j, pair_shift, typespin, rc_r, n_r,
                         rc_a, n_a);
  const c10::cuda::OptionalCUDAGuard guard(positions.device());
  const int64_t N = positions.size(0);
  const int D = cheb::descriptor_dim(int(n_r), int(n_a), typespin.size(0) > 1);
  TORCH_CHECK(grad_G.dim() == 2 && grad_G.size(0) == N && grad_G.size(1) == D,
              "chebyshev_backward: grad_G must be [N, ", D, "], got ", grad_G.sizes());
  auto g = grad_G.to(positions.scalar_type()).contiguous();
  const int64_t Pn = pair_j.size(0);
  auto dopt = positions.options().dtype(torch::kDouble);
  auto dR = torch::empty({N, 3}, dopt);
  auto gp = torch::empty({std::max<int64_t>(1, Pn), 3}, dopt);
  auto scratch = scratch_for(positions, Pn);
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(positions.scalar_type(), "chebyshev_backward_cuda", [&] {
    const auto P = cuda_problem<scalar_t>(positions, species, pair_ptr, pair_j, pair_shift,
                                          typespin, rc_r, n_r, rc_a, n_a);
    check_cuda(cheb::cuda::launch_vjp<scalar_t>(P, g.data_ptr<scalar_t>(),
                                                scratch.data_ptr<double>(), gp.data_ptr<double>(),
                                                dR.data_ptr<double>(), stream),
               "chebyshev_backward");
  });
  return dR.to(positions.scalar_type());
}

std::tuple<torch::Tensor, torch::Tensor> chebyshev_double_backward_cuda(
    const torch::Tensor& grad_G, const torch::Tensor& v, const torch::Tensor& positions,
    const torch::Tensor& species, const torch::Tensor& pair_ptr, const torch::Tensor& pair_j,
    const torch::Tensor& pair_shift, const torch::Tensor& typespin, double rc_r, int64_t n_r,
    double rc_a, int64_t n_a, bool need_jvp, bool need_hvp,
    const std::optional<torch::Tensor>& /*moments*/) {
  chebyshev_check_inputs(positions, species, pair_ptr, pair_j, pair_shift, typespin, rc_r, n_r,
                         rc_a, n_a);
  const c10::cuda::OptionalCUDAGuard guard(positions.device());
  const int64_t N = positions.size(0);
  const int D = cheb::descriptor_dim(int(n_r), int(n_a), typespin.size(0) > 1);
  TORCH_CHECK(grad_G.dim() == 2 && grad_G.size(0) == N && grad_G.size(1) == D,
              "chebyshev_double_backward: grad_G must be [N, ", D, "], got ", grad_G.sizes());
  TORCH_CHECK(v.dim() == 2 && v.size(0) == N && v.size(1) == 3,
              "chebyshev_double_backward: v must be [N, 3], got ", v.sizes());
  auto g = grad_G.to(positions.scalar_type()).contiguous();
  auto vv = v.to(positions.scalar_type()).contiguous();
  const int64_t Pn = pair_j.size(0);
  auto dopt = positions.options().dtype(torch::kDouble);
  torch::Tensor jv = need_jvp ? torch::empty({N, D}, positions.options())
                              : torch::empty({0}, positions.options());
  torch::Tensor hv = need_hvp ? torch::empty({N, 3}, dopt) : torch::empty({0}, dopt);
  torch::Tensor hp = need_hvp ? torch::empty({std::max<int64_t>(1, Pn), 3}, dopt)
                              : torch::empty({0}, dopt);
  if (!need_jvp && !need_hvp) return {jv, hv.to(positions.scalar_type())};
  auto scratch = scratch_for(positions, Pn);
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(positions.scalar_type(), "chebyshev_double_backward_cuda", [&] {
    const auto P = cuda_problem<scalar_t>(positions, species, pair_ptr, pair_j, pair_shift,
                                          typespin, rc_r, n_r, rc_a, n_a);
    check_cuda(cheb::cuda::launch_jvp_hvp<scalar_t>(
                   P, g.data_ptr<scalar_t>(), vv.data_ptr<scalar_t>(), scratch.data_ptr<double>(),
                   need_jvp ? jv.data_ptr<scalar_t>() : nullptr,
                   need_hvp ? hp.data_ptr<double>() : nullptr,
                   need_hvp ? hv.data_ptr<double>() : nullptr, need_jvp, need_hvp, stream),
               "chebyshev_double_backward");
  });
  return {jv, hv.to(positions.scalar_type())};
}

}  // namespace distmlip

TORCH_LIBRARY_IMPL(distmlip, CUDA, m) {
  m.impl("chebyshev_forward", &distmlip::chebyshev_forward_cuda);
  m.impl("chebyshev_backward", &distmlip::chebyshev_backward_cuda);
  m.impl("chebyshev_double_backward", &distmlip::chebyshev_double_backward_cuda);
}

#endif  // DISTMLIP_WITH_CUDA
