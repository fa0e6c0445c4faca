// Energies and forces of a Behler-Parrinello potential in one CPU operator, and the gradients
// of any loss on them in one more: the force-training step of distmlip/models/fused_forces.py.
//
//   distmlip::bpnn_energy_forces(positions, species, pair_ptr, pair_j, pair_shift, typespin,
//       rc_radial, n_radial, rc_angular, n_angular, mean [T, D], inv_std [T, D], base [T],
//       scale [], structure [N], n_structures, params, activations)
//     -> (E [B] float64, F [N, 3], x [N, D], g [N, D], moments)
//
//       G, moments = chebyshev_forward_moments(positions)
//       x = (G - mean[t]) * inv_std[t]                     (t = species of the atom)
//       y, dy/dx = bpnn_nets_forward(x)
//       E = sum over the atoms of each structure of base[t] + scale * y
//       g = dE/dG = scale * inv_std[t] * dy/dx
//       F = -chebyshev_backward(g) = -J^T g                (J = dG/dR)
//
//   distmlip::bpnn_energy_forces_backward(Ebar?, Fbar?, positions, ..., x, g, moments, inv_std,
//       scale, structure, params, activations, need_params, need_positions, flat_params)
//     -> [grad of every parameter (each [0] unless need_params)..., grad of positions or [0]],
//        or with flat_params [the parameter gradients concatenated (flattened), positions]
//
//       ybar = scale * Ebar[structure]
//       J (-Fbar), H = chebyshev_double_backward(g, -Fbar)   (the JVP; the HVP for positions)
//       ubar = scale * inv_std[t] * J (-Fbar)               (cotangent of dy/dx)
//       parameter grads, xbar = bpnn_nets_backward(x, ybar, ubar)
//       positions: J^T (inv_std[t] * xbar) + H
//
// The networks run in the dtype of their parameters; the descriptor in that of the positions;
// normalisation, energies and the per-structure sums are float64.  Why one operator: with the
// few hundred atoms of a training batch of small molecules, the kernels take well under half of
// a step made of a dozen Python-level operations and autograd nodes; here the glue costs a few
// microseconds.
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

#include "cpu_ops.h"

namespace distmlip {
namespace {

void check_normalisation(const torch::Tensor& mean, const torch::Tensor& inv_std, const torch::Tensor& base,
                         const torch::Tensor& scale, int64_t T, int64_t D) {
  TORCH_CHECK(mean.dim() == 2 && mean.size(0) == T && mean.size(1) == D && mean.scalar_type() == torch::kDouble,
              "bpnn_energy_forces: mean must be float64 [T, D] = [", T, ", ", D, "], got ", mean.sizes());
  TORCH_CHECK(inv_std.sizes() == mean.sizes() && inv_std.scalar_type() == torch::kDouble,
              "bpnn_energy_forces: inv_std must be float64 [T, D]");
  TORCH_CHECK(base.dim() == 1 && base.size(0) == T && base.scalar_type() == torch::kDouble,
              "bpnn_energy_forces: base must be float64 [T]");
  TORCH_CHECK(scale.numel() == 1, "bpnn_energy_forces: scale must have one element");
}

int64_t n_species(const std::vector<torch::Tensor>& params, const std::vector<int64_t>& activations) {
  const int64_t per_species = 2 * (int64_t(activations.size()) + 1);
  TORCH_CHECK(!params.empty() && int64_t(params.size()) % per_species == 0,
              "bpnn_energy_forces: ", params.size(), " parameters do not make whole networks of ",
              activations.size() + 1, " layers");
  return int64_t(params.size()) / per_species;
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> energy_forces_cpu(
    const torch::Tensor& positions, const torch::Tensor& species, const torch::Tensor& pair_ptr,
    const torch::Tensor& pair_j, const torch::Tensor& pair_shift, const torch::Tensor& typespin,
    double rc_r, int64_t n_r, double rc_a, int64_t n_a, const torch::Tensor& mean,
    const torch::Tensor& inv_std, const torch::Tensor& base, const torch::Tensor& scale,
    const torch::Tensor& structure, int64_t n_structures, std::vector<torch::Tensor> params,
    std::vector<int64_t> activations) {
  const int64_t T = n_species(params, activations);
  auto [G, moments] = chebyshev_forward_moments_cpu(positions, species, pair_ptr, pair_j, pair_shift,
                                                    typespin, rc_r, n_r, rc_a, n_a);
  const int64_t N = G.size(0), D = G.size(1);
  check_normalisation(mean, inv_std, base, scale, T, D);
  TORCH_CHECK(structure.dim() == 1 && structure.size(0) == N && structure.scalar_type() == torch::kLong,
              "bpnn_energy_forces: structure must be int64 [N]");
  TORCH_CHECK(n_structures >= 0, "bpnn_energy_forces: n_structures must be >= 0");
  const double s = scale.item<double>();
  // the species were range-checked by the descriptor kernel
  const auto inv_std_sp = inv_std.index_select(0, species);
  auto x = (G.to(torch::kDouble) - mean.index_select(0, species)).mul_(inv_std_sp);
  x = x.to(params[0].scalar_type());
  auto [y, dydx] = bpnn_nets_forward_cpu(x, species, params, activations, true);
  auto e = base.index_select(0, species).add_(y.to(torch::kDouble), s);
  auto E = torch::zeros({n_structures}, e.options()).index_add_(0, structure, e);
  auto g = dydx.to(torch::kDouble).mul_(inv_std_sp).mul_(s).to(positions.scalar_type()).contiguous();
  const bool with_moments = moments.size(1) > 0;
  auto F = chebyshev_backward_cpu(g, positions, species, pair_ptr, pair_j, pair_shift, typespin, rc_r, n_r,
                                  rc_a, n_a, with_moments ? std::optional<torch::Tensor>(moments)
                                                          : std::optional<torch::Tensor>())
               .neg_();
  return {E, F, x, g, moments};
}

std::vector<torch::Tensor> energy_forces_backward_cpu(
    const std::optional<torch::Tensor>& Ebar, const std::optional<torch::Tensor>& Fbar,
    const torch::Tensor& positions, const torch::Tensor& species, const torch::Tensor& pair_ptr,
    const torch::Tensor& pair_j, const torch::Tensor& pair_shift, const torch::Tensor& typespin,
    double rc_r, int64_t n_r, double rc_a, int64_t n_a, const torch::Tensor& x, const torch::Tensor& g,
    const torch::Tensor& moments, const torch::Tensor& inv_std, const torch::Tensor& scale,
    const torch::Tensor& structure, std::vector<torch::Tensor> params, std::vector<int64_t> activations,
    bool need_params, bool need_positions, bool flat_params) {
  const int64_t N = positions.size(0);
  const int64_t T = n_species(params, activations);
  TORCH_CHECK(x.dim() == 2 && x.size(0) == N && g.sizes() == x.sizes(),
              "bpnn_energy_forces_backward: x and g must be the [N, D] outputs of the forward");
  TORCH_CHECK(inv_std.dim() == 2 && inv_std.size(0) == T && inv_std.size(1) == x.size(1) &&
                  inv_std.scalar_type() == torch::kDouble,
              "bpnn_energy_forces_backward: inv_std must be float64 [T, D]");
  TORCH_CHECK(scale.numel() == 1, "bpnn_energy_forces_backward: scale must have one element");
  const double s = scale.item<double>();
  const bool has_E = Ebar.has_value() && Ebar->defined();
  const bool has_F = Fbar.has_value() && Fbar->defined();
  const auto net_dtype = x.scalar_type();
  std::optional<torch::Tensor> mom;
  if (moments.dim() == 2 && moments.size(0) == N && moments.size(1) > 0) mom = moments;
  const torch::Tensor inv_std_sp = inv_std.index_select(0, species);

  std::optional<torch::Tensor> ybar, ubar;
  if (has_E) {
    TORCH_CHECK(structure.dim() == 1 && structure.size(0) == N,
                "bpnn_energy_forces_backward: structure must be int64 [N]");
    ybar = Ebar->to(torch::kDouble).index_select(0, structure).mul_(s).to(net_dtype);
  }
  torch::Tensor hv;
  if (has_F) {
    TORCH_CHECK(Fbar->dim() == 2 && Fbar->size(0) == N && Fbar->size(1) == 3,
                "bpnn_energy_forces_backward: the force cotangent must be [N, 3]");
    auto v = Fbar->to(positions.scalar_type()).neg().contiguous();
    auto [jv, h] = chebyshev_double_backward_cpu(g, v, positions, species, pair_ptr, pair_j, pair_shift,
                                                 typespin, rc_r, n_r, rc_a, n_a, true, need_positions, mom);
    hv = h;
    ubar = jv.to(torch::kDouble).mul_(inv_std_sp).mul_(s).to(net_dtype);
  }
  std::vector<torch::Tensor> out(params.size() + 1);
  for (size_t k = 0; k < params.size(); ++k) out[k] = torch::zeros({0}, x.options());
  torch::Tensor gpos;
  if ((need_params || need_positions) && (has_E || has_F)) {
    auto nb = bpnn_nets_backward_cpu(x, species, params, activations, ybar, ubar, need_positions);
    if (need_params)
      for (size_t k = 0; k < params.size(); ++k) out[k] = nb[k];
    if (need_positions) {
      auto Gbar = nb.back().to(torch::kDouble).mul_(inv_std_sp).to(positions.scalar_type()).contiguous();
      gpos = chebyshev_backward_cpu(Gbar, positions, species, pair_ptr, pair_j, pair_shift, typespin, rc_r,
                                    n_r, rc_a, n_a, mom);
    }
  }
  if (need_positions && hv.defined() && hv.numel() > 0) gpos = gpos.defined() ? gpos.add_(hv) : hv;
  out.back() = gpos.defined() ? gpos : torch::zeros({0}, positions.options());
  if (flat_params) {  // one flat gradient of all parameters, in order (FlatParameters)
    std::vector<torch::Tensor> parts;
    parts.reserve(params.size());
    for (size_t k = 0; k < params.size(); ++k)
      parts.push_back(need_params ? out[k].reshape({-1}) : torch::zeros({params[k].numel()}, x.options()));
    return {torch::cat(parts), out.back()};
  }
  return out;
}

}  // namespace
}  // namespace distmlip

TORCH_LIBRARY_FRAGMENT(distmlip, m) {
  m.def(
      "bpnn_energy_forces(Tensor positions, Tensor species, Tensor pair_ptr, Tensor pair_j, "
      "Tensor pair_shift, Tensor typespin, float rc_radial, int n_radial, float rc_angular, "
      "int n_angular, Tensor mean, Tensor inv_std, Tensor base, Tensor scale, Tensor structure, "
      "int n_structures, Tensor[] params, int[] activations) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bpnn_energy_forces_backward(Tensor? Ebar, Tensor? Fbar, Tensor positions, Tensor species, "
      "Tensor pair_ptr, Tensor pair_j, Tensor pair_shift, Tensor typespin, float rc_radial, "
      "int n_radial, float rc_angular, int n_angular, Tensor x, Tensor g, Tensor moments, "
      "Tensor inv_std, Tensor scale, Tensor structure, Tensor[] params, int[] activations, "
      "bool need_params, bool need_positions, bool flat_params) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(distmlip, CPU, m) {
  m.impl("bpnn_energy_forces", &distmlip::energy_forces_cpu);
  m.impl("bpnn_energy_forces_backward", &distmlip::energy_forces_backward_cpu);
}
