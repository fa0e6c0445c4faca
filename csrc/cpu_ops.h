// CPU operator implementations shared between translation units: the combined energy-and-forces
// operator of a Behler-Parrinello potential (bpnn_forces_cpu.cpp) calls the descriptor kernels
// (chebyshev_cpu.cpp) and the per-species networks (nets_cpu.cpp) directly, without going
// through the dispatcher or Python.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

namespace distmlip {

std::tuple<torch::Tensor, torch::Tensor> chebyshev_forward_moments_cpu(
    const torch::Tensor& positions, const torch::Tensor& species, const torch::Tensor& pair_ptr,
    const torch::Tensor& pair_j, const torch::Tensor& pair_shift, const torch::Tensor& typespin,
    double rc_r, int64_t n_r, double rc_a, int64_t n_a);

torch::Tensor chebyshev_backward_cpu(const torch::Tensor& grad_G, const torch::Tensor& positions,
                                     const torch::Tensor& species, const torch::Tensor& pair_ptr,
                                     const torch::Tensor& pair_j, const torch::Tensor& pair_shift,
                                     const torch::Tensor& typespin, double rc_r, int64_t n_r,
                                     double rc_a, int64_t n_a,
                                     const std::optional<torch::Tensor>& moments);

std::tuple<torch::Tensor, torch::Tensor> chebyshev_double_backward_cpu(
    const torch::Tensor& grad_G, const torch::Tensor& v, const torch::Tensor& positions,
    const torch::Tensor& species, const torch::Tensor& pair_ptr, const torch::Tensor& pair_j,
    const torch::Tensor& pair_shift, const torch::Tensor& typespin, double rc_r, int64_t n_r,
    double rc_a, int64_t n_a, bool need_jvp, bool need_hvp,
    const std::optional<torch::Tensor>& moments);

std::tuple<torch::Tensor, torch::Tensor> bpnn_nets_forward_cpu(const torch::Tensor& x,
                                                               const torch::Tensor& species,
                                                               std::vector<torch::Tensor> params,
                                                               std::vector<int64_t> activations,
                                                               bool with_grad, torch::Tensor* saved = nullptr);

// saved (forward): if not null, receives the forward's intermediates [N, k] float64, which the
// backward takes as `saved` instead of recomputing them (same x, species and parameters)
// flat: [all parameter gradients concatenated in parameter order, x-bar] instead of one tensor
// per parameter
std::vector<torch::Tensor> bpnn_nets_backward_cpu(const torch::Tensor& x, const torch::Tensor& species,
                                                  std::vector<torch::Tensor> params,
                                                  std::vector<int64_t> activations,
                                                  const std::optional<torch::Tensor>& ybar,
                                                  const std::optional<torch::Tensor>& ubar, bool need_x,
                                                  bool flat = false, const torch::Tensor* saved = nullptr);

}  // namespace distmlip
