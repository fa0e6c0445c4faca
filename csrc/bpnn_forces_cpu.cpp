// Energies and forces of a Behler-Parrinello potential in one CPU operator, and the gradients
// of any loss on them in one more: the force-training step of distmlip/models/fused_forces.py.
//
//   distmlip::bpnn_energy_forces(positions, species, pair_ptr, pair_j, pair_shift, typespin,
//       rc_radial, n_radial, rc_angular, n_angular, mean [T, D], inv_std [T, D], base [T],
//       scale [], structure [N], n_structures, params, activations)
//     -> (E [B] float64, F [N, 3], x [N, D], g [N, D], moments, nets_saved)
//
//       G, moments = chebyshev_forward_moments(positions)
//       x = (G - mean[t]) * inv_std[t]                     (t = species of the atom)
//       y, dy/dx = bpnn_nets_forward(x)                   (its intermediates kept: nets_saved)
//       E = sum over the atoms of each structure of base[t] + scale * y
//       g = dE/dG = scale * inv_std[t] * dy/dx
//       F = -chebyshev_backward(g) = -J^T g                (J = dG/dR)
//
//     With float64 positions and networks the lines above run by blocks of 8-64 centres
//     (chebyshev_forward_vjp_cpu, NetsForward): each centre's pair pass serves both its
//     descriptor row and, once its network has given g, its VJP, instead of being redone by a
//     separate VJP pass over all pairs.  Same values, bitwise.
//
//   distmlip::bpnn_energy_forces_virial(<the same inputs>)
//     -> (E, F, W [B, 3, 3] float64, x, g, moments, nets_saved)   (float64 positions and networks)
//
//       W = sum over the pairs of each structure of r_p (x) dE/d r_p = dE/d(strain), the virial
//       (stress = sym(W) / V), summed per centre from the pair gradients the VJP forms anyway.
//
//   distmlip::bpnn_energy_forces_backward(Ebar?, Fbar?, positions, ..., x, g, moments, nets_saved, inv_std,
//       scale, structure, params, activations, need_params, need_positions, flat_params, Wbar?)
//     -> [grad of every parameter (each [0] unless need_params)..., grad of positions or [0]],
//        or with flat_params [the parameter gradients concatenated (flattened), positions]
//
//       ybar = scale * Ebar[structure]
//       J (-Fbar), H = chebyshev_double_backward(g, -Fbar)   (the JVP; the HVP for positions)
//         with Wbar (cotangent of W) the JVP's pair tangents get r_p Wbar[structure] added:
//         <Wbar, W> = sum_p dE/d r_p . (r_p Wbar), so the stress term's weight gradient is the
//         same product in the strain direction (no positions gradient then)
//       ubar = scale * inv_std[t] * J (-Fbar)               (cotangent of dy/dx)
//       parameter grads, xbar = bpnn_nets_backward(x, ybar, ubar)   (from nets_saved, no recompute)
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

#include "chebyshev.h"
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

// rows a0 .. a1 - 1 of x = (G - mean[t]) * inv_std[t] (float64 [N, D] arrays, t = sp[a])
void normalise_rows(const double* G, const int64_t* sp, const double* mean, const double* inv_std, int64_t D,
                    int64_t a0, int64_t a1, double* x) {
  for (int64_t a = a0; a < a1; ++a) {
    const double* m = mean + sp[a] * D;
    const double* is = inv_std + sp[a] * D;
    for (int64_t d = 0; d < D; ++d) x[a * D + d] = (G[a * D + d] - m[d]) * is[d];
  }
}

// rows a0 .. a1 - 1 of out = v * inv_std[t] * factor (float64 [N, D]; out may be v)
void scale_rows_range(const double* v, const int64_t* sp, const double* inv_std, double factor, int64_t D,
                      int64_t a0, int64_t a1, double* out) {
  for (int64_t a = a0; a < a1; ++a) {
    const double* is = inv_std + sp[a] * D;
    for (int64_t d = 0; d < D; ++d) out[a * D + d] = v[a * D + d] * is[d] * factor;
  }
}

// x = (G - mean[t]) * inv_std[t] in the networks' dtype
torch::Tensor normalise(const torch::Tensor& G, const torch::Tensor& species, const torch::Tensor& mean,
                        const torch::Tensor& inv_std, c10::ScalarType net_dtype) {
  const int64_t N = G.size(0), D = G.size(1);
  if (G.scalar_type() == torch::kDouble && net_dtype == torch::kDouble) {
    auto x = torch::empty({N, D}, G.options());
    normalise_rows(G.data_ptr<double>(), species.data_ptr<int64_t>(), mean.data_ptr<double>(),
                   inv_std.data_ptr<double>(), D, 0, N, x.data_ptr<double>());
    return x;
  }
  return (G.to(torch::kDouble) - mean.index_select(0, species)).mul_(inv_std.index_select(0, species)).to(net_dtype);
}

// rows of v [N, D] times factor * inv_std[t], in dtype out_dtype
torch::Tensor scale_rows(const torch::Tensor& v, const torch::Tensor& species, const torch::Tensor& inv_std,
                         double factor, c10::ScalarType out_dtype) {
  const int64_t N = v.size(0), D = v.size(1);
  if (v.scalar_type() == torch::kDouble && out_dtype == torch::kDouble && v.is_contiguous()) {
    auto out = torch::empty({N, D}, v.options());
    scale_rows_range(v.data_ptr<double>(), species.data_ptr<int64_t>(), inv_std.data_ptr<double>(), factor, D, 0,
                     N, out.data_ptr<double>());
    return out;
  }
  return v.to(torch::kDouble).mul(inv_std.index_select(0, species)).mul_(factor).to(out_dtype).contiguous();
}

void check_structure(const torch::Tensor& structure, int64_t N, int64_t n_structures) {
  TORCH_CHECK(structure.dim() == 1 && structure.size(0) == N && structure.scalar_type() == torch::kLong &&
                  structure.is_contiguous(),
              "bpnn_energy_forces: structure must be contiguous int64 [N]");
  TORCH_CHECK(n_structures >= 0, "bpnn_energy_forces: n_structures must be >= 0");
  const int64_t* ps = structure.data_ptr<int64_t>();
  for (int64_t a = 0; a < N; ++a)
    TORCH_CHECK(ps[a] >= 0 && ps[a] < n_structures, "bpnn_energy_forces: atom ", a, " has structure index ",
                ps[a], ", outside [0, ", n_structures, ")");
}

// E [B] = per structure, the sum in atom order of base[t] + s * y (float64)
torch::Tensor structure_energies(const double* py, const torch::Tensor& species, const torch::Tensor& base,
                                 double s, const torch::Tensor& structure, int64_t n_structures) {
  auto E = torch::zeros({n_structures}, base.options());
  const int64_t N = species.size(0);
  const double* pb = base.data_ptr<double>();
  const int64_t* sp = species.data_ptr<int64_t>();
  const int64_t* ps = structure.data_ptr<int64_t>();
  double* pE = E.data_ptr<double>();
  for (int64_t a = 0; a < N; ++a) pE[ps[a]] += pb[sp[a]] + s * py[a];
  return E;
}

// The float64 forward: descriptor, networks and VJP in one pass over the centres
// (chebyshev_forward_vjp_cpu): as soon as a small block of centres has its descriptor rows, they
// are normalised and run through their networks (NetsForward), and g = dE/dG of the block feeds
// the block's VJP while its pair data are still in the cache.  Same values as the unpipelined
// path below (bitwise: every per-atom product is the same).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor>
energy_forces_pipelined(
    const torch::Tensor& positions, const torch::Tensor& species, const torch::Tensor& pair_ptr,
    const torch::Tensor& pair_j, const torch::Tensor& pair_shift, const torch::Tensor& typespin,
    double rc_r, int64_t n_r, double rc_a, int64_t n_a, const torch::Tensor& mean,
    const torch::Tensor& inv_std, const torch::Tensor& base, const torch::Tensor& scale,
    const torch::Tensor& structure, int64_t n_structures, const std::vector<torch::Tensor>& params,
    const std::vector<int64_t>& activations, int64_t T, torch::Tensor* virial = nullptr) {
  // the descriptor's input checks first: D below needs valid orders
  chebyshev_check_inputs(positions, species, pair_ptr, pair_j, pair_shift, typespin, rc_r, n_r, rc_a, n_a);
  const int64_t N = positions.size(0);
  const int64_t D = cheb::descriptor_dim(int(n_r), int(n_a), typespin.size(0) > 1);
  check_normalisation(mean, inv_std, base, scale, T, D);
  TORCH_CHECK(mean.is_contiguous() && inv_std.is_contiguous() && base.is_contiguous(),
              "bpnn_energy_forces: mean, inv_std and base must be contiguous");
  check_structure(structure, N, n_structures);
  const int64_t* sp = species.data_ptr<int64_t>();
  for (int64_t a = 0; a < N; ++a)
    TORCH_CHECK(sp[a] >= 0 && sp[a] < T, "bpnn_energy_forces: atom ", a, " has species index ", sp[a],
                ", the model has ", T, " networks");
  const double s = scale.item<double>();
  const NetsForward nets(params, activations, D);
  const auto dopt = positions.options().dtype(torch::kDouble);
  auto x = torch::empty({N, D}, dopt);
  auto y = torch::empty({N}, dopt);
  auto nets_saved = torch::empty({N, nets.save_row()}, dopt);
  double* px = x.data_ptr<double>();
  double* py = y.data_ptr<double>();
  double* psave = nets_saved.data_ptr<double>();
  const double* pm = mean.data_ptr<double>();
  const double* pi = inv_std.data_ptr<double>();
  // rows c0 .. c1 - 1: x = (G - mean[t]) * inv_std[t]; y, dy/dx (into g); g = s * inv_std[t] * dy/dx
  auto rows = [&](int64_t c0, int64_t c1, const double* G, double* g) {
    normalise_rows(G, sp, pm, pi, D, c0, c1, px);
    nets.run(px, sp, c0, c1 - c0, py, g, psave);
    scale_rows_range(g, sp, pi, s, D, c0, c1, g);
  };
  torch::Tensor vir;
  auto [G, moments, g, dR] = chebyshev_forward_vjp_cpu(positions, species, pair_ptr, pair_j, pair_shift, typespin,
                                                       rc_r, n_r, rc_a, n_a, rows,
                                                       virial != nullptr ? &vir : nullptr);
  auto E = structure_energies(py, species, base, s, structure, n_structures);
  if (virial != nullptr) {   // per structure, the centres' rows summed in atom order
    *virial = torch::zeros({n_structures, 3, 3}, dopt);
    double* pW = virial->data_ptr<double>();
    const double* pv = vir.data_ptr<double>();
    const int64_t* ps = structure.data_ptr<int64_t>();
    for (int64_t a = 0; a < N; ++a)
      for (int k = 0; k < 9; ++k) pW[9 * ps[a] + k] += pv[9 * a + k];
  }
  return {E, dR.neg_(), x, g, moments, nets_saved};
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor>
energy_forces_cpu(
    const torch::Tensor& positions, const torch::Tensor& species, const torch::Tensor& pair_ptr,
    const torch::Tensor& pair_j, const torch::Tensor& pair_shift, const torch::Tensor& typespin,
    double rc_r, int64_t n_r, double rc_a, int64_t n_a, const torch::Tensor& mean,
    const torch::Tensor& inv_std, const torch::Tensor& base, const torch::Tensor& scale,
    const torch::Tensor& structure, int64_t n_structures, std::vector<torch::Tensor> params,
    std::vector<int64_t> activations) {
  const int64_t T = n_species(params, activations);
  if (positions.scalar_type() == torch::kDouble && params[0].scalar_type() == torch::kDouble)
    return energy_forces_pipelined(positions, species, pair_ptr, pair_j, pair_shift, typespin, rc_r, n_r, rc_a,
                                   n_a, mean, inv_std, base, scale, structure, n_structures, params, activations, T);
  auto [G, moments] = chebyshev_forward_moments_cpu(positions, species, pair_ptr, pair_j, pair_shift,
                                                    typespin, rc_r, n_r, rc_a, n_a);
  const int64_t N = G.size(0), D = G.size(1);
  check_normalisation(mean, inv_std, base, scale, T, D);
  TORCH_CHECK(mean.is_contiguous() && inv_std.is_contiguous() && base.is_contiguous(),
              "bpnn_energy_forces: mean, inv_std and base must be contiguous");
  check_structure(structure, N, n_structures);
  const double s = scale.item<double>();
  // the species were range-checked by the descriptor kernel
  const auto x = normalise(G, species, mean, inv_std, params[0].scalar_type());
  torch::Tensor nets_saved;   // the networks' intermediates, for the backward
  auto [y, dydx] = bpnn_nets_forward_cpu(x, species, params, activations, true, &nets_saved);
  const auto yd = y.to(torch::kDouble).contiguous();
  auto E = structure_energies(yd.data_ptr<double>(), species, base, s, structure, n_structures);
  auto g = scale_rows(dydx, species, inv_std, s, positions.scalar_type());   // dE/dG
  const bool with_moments = moments.size(1) > 0;
  auto F = chebyshev_backward_cpu(g, positions, species, pair_ptr, pair_j, pair_shift, typespin, rc_r, n_r,
                                  rc_a, n_a, with_moments ? std::optional<torch::Tensor>(moments)
                                                          : std::optional<torch::Tensor>())
               .neg_();
  return {E, F, x, g, moments, nets_saved};
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor>
energy_forces_virial_cpu(
    const torch::Tensor& positions, const torch::Tensor& species, const torch::Tensor& pair_ptr,
    const torch::Tensor& pair_j, const torch::Tensor& pair_shift, const torch::Tensor& typespin,
    double rc_r, int64_t n_r, double rc_a, int64_t n_a, const torch::Tensor& mean,
    const torch::Tensor& inv_std, const torch::Tensor& base, const torch::Tensor& scale,
    const torch::Tensor& structure, int64_t n_structures, std::vector<torch::Tensor> params,
    std::vector<int64_t> activations) {
  const int64_t T = n_species(params, activations);
  TORCH_CHECK(positions.scalar_type() == torch::kDouble && params[0].scalar_type() == torch::kDouble,
              "bpnn_energy_forces_virial: float64 positions and networks only");
  torch::Tensor W;
  auto [E, F, x, g, moments, nets_saved] =
      energy_forces_pipelined(positions, species, pair_ptr, pair_j, pair_shift, typespin, rc_r, n_r, rc_a, n_a,
                              mean, inv_std, base, scale, structure, n_structures, params, activations, T, &W);
  return {E, F, W, x, g, moments, nets_saved};
}

std::vector<torch::Tensor> energy_forces_backward_cpu(
    const std::optional<torch::Tensor>& Ebar, const std::optional<torch::Tensor>& Fbar,
    const torch::Tensor& positions, const torch::Tensor& species, const torch::Tensor& pair_ptr,
    const torch::Tensor& pair_j, const torch::Tensor& pair_shift, const torch::Tensor& typespin,
    double rc_r, int64_t n_r, double rc_a, int64_t n_a, const torch::Tensor& x, const torch::Tensor& g,
    const torch::Tensor& moments, const torch::Tensor& nets_saved, const torch::Tensor& inv_std,
    const torch::Tensor& scale,
    const torch::Tensor& structure, std::vector<torch::Tensor> params, std::vector<int64_t> activations,
    bool need_params, bool need_positions, bool flat_params, const std::optional<torch::Tensor>& Wbar) {
  const int64_t N = positions.size(0);
  const int64_t T = n_species(params, activations);
  TORCH_CHECK(x.dim() == 2 && x.size(0) == N && g.sizes() == x.sizes() && species.size(0) == N,
              "bpnn_energy_forces_backward: x and g must be the [N, D] outputs of the forward");
  TORCH_CHECK(inv_std.dim() == 2 && inv_std.size(0) == T && inv_std.size(1) == x.size(1) &&
                  inv_std.scalar_type() == torch::kDouble && inv_std.is_contiguous(),
              "bpnn_energy_forces_backward: inv_std must be contiguous float64 [T, D]");
  TORCH_CHECK(scale.numel() == 1, "bpnn_energy_forces_backward: scale must have one element");
  const double s = scale.item<double>();
  const bool has_E = Ebar.has_value() && Ebar->defined();
  const bool has_F = Fbar.has_value() && Fbar->defined();
  const bool has_W = Wbar.has_value() && Wbar->defined();
  TORCH_CHECK(!(has_W && need_positions),
              "bpnn_energy_forces_backward: a virial cotangent gives parameter gradients only");
  const auto net_dtype = x.scalar_type();
  std::optional<torch::Tensor> mom;
  if (moments.dim() == 2 && moments.size(0) == N && moments.size(1) > 0) mom = moments;

  std::optional<torch::Tensor> ybar, ubar;
  if (has_E) {
    TORCH_CHECK(structure.dim() == 1 && structure.size(0) == N && structure.scalar_type() == torch::kLong &&
                    structure.is_contiguous(),
                "bpnn_energy_forces_backward: structure must be contiguous int64 [N]");
    const auto eb = Ebar->to(torch::kDouble).contiguous();
    const int64_t B = eb.numel();
    auto yb = torch::empty({N}, eb.options());
    const double* pe = eb.data_ptr<double>();
    const int64_t* ps = structure.data_ptr<int64_t>();
    double* py = yb.data_ptr<double>();
    for (int64_t a = 0; a < N; ++a) {
      TORCH_CHECK(ps[a] >= 0 && ps[a] < B, "bpnn_energy_forces_backward: structure index out of range");
      py[a] = pe[ps[a]] * s;
    }
    ybar = yb.to(net_dtype);
  }
  torch::Tensor hv;
  if (has_F || has_W) {
    torch::Tensor v;
    if (has_F) {
      TORCH_CHECK(Fbar->dim() == 2 && Fbar->size(0) == N && Fbar->size(1) == 3,
                  "bpnn_energy_forces_backward: the force cotangent must be [N, 3]");
      v = Fbar->to(positions.scalar_type()).neg().contiguous();
    } else {
      v = torch::zeros({N, 3}, positions.options());
    }
    std::optional<torch::Tensor> strain;
    if (has_W) strain = Wbar->to(torch::kDouble).contiguous();
    auto [jv, h] = chebyshev_double_backward_strain_cpu(g, v, positions, species, pair_ptr, pair_j, pair_shift,
                                                        typespin, rc_r, n_r, rc_a, n_a, true, need_positions, mom,
                                                        strain, structure);
    hv = h;
    ubar = scale_rows(jv, species, inv_std, s, net_dtype);      // cotangent of dy/dx
  }
  torch::Tensor gpos;
  std::vector<torch::Tensor> out;
  const bool any = (need_params || need_positions) && (has_E || has_F || has_W);
  if (any) {
    out = bpnn_nets_backward_cpu(x, species, params, activations, ybar, ubar, need_positions, flat_params,
                                 &nets_saved);
    if (need_positions) {
      auto Gbar = scale_rows(out.back(), species, inv_std, 1.0, positions.scalar_type());
      gpos = chebyshev_backward_cpu(Gbar, positions, species, pair_ptr, pair_j, pair_shift, typespin, rc_r,
                                    n_r, rc_a, n_a, mom);
    }
  }
  if (!any || !need_params) {   // no parameter gradients: empty placeholders
    const size_t n_out = flat_params ? 1 : params.size();
    out.assign(n_out + 1, torch::Tensor());
    for (size_t k = 0; k < n_out; ++k) out[k] = torch::zeros({0}, x.options());
  }
  if (need_positions && hv.defined() && hv.numel() > 0) gpos = gpos.defined() ? gpos.add_(hv) : hv;
  out.back() = gpos.defined() ? gpos : torch::zeros({0}, positions.options());
  return out;
}

// The training loss (distmlip/training/losses.py) of a batch and its gradients in E and F:
//   L = a_E sum_s w_s e_s^2 / c_0 + a_F sum_{i, comp} w_{s(i)} m_i (F_ic - F_ic^ref)^2 / c_1,
//   e_s = (E_s - E_s^ref) / n_s (per_atom) or E_s - E_s^ref, a_E = 1 - alpha, a_F = alpha (forces
//   given) or a_E = 1; the force term is 0 when c_1 = 0.  Sums in float64, in index order.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> energy_force_loss_cpu(
    const torch::Tensor& E, const torch::Tensor& E_ref, const torch::Tensor& weight, const torch::Tensor& natoms,
    bool per_atom, const std::optional<torch::Tensor>& F, const std::optional<torch::Tensor>& F_ref,
    const std::optional<torch::Tensor>& structure, const std::optional<torch::Tensor>& mask,
    const torch::Tensor& counts, double alpha) {
  const int64_t B = E.numel();
  TORCH_CHECK(E.dim() == 1 && E_ref.numel() == B && weight.numel() == B && natoms.numel() == B,
              "energy_force_loss: E, E_ref, weight and natoms must have one entry per structure");
  TORCH_CHECK(counts.numel() == 2, "energy_force_loss: counts must have 2 entries");
  const auto cd = counts.to(torch::kDouble).contiguous();
  const double c0 = cd.data_ptr<double>()[0], c1 = cd.data_ptr<double>()[1];
  const auto e = E.to(torch::kDouble).contiguous(), er = E_ref.to(torch::kDouble).contiguous();
  const auto w = weight.to(torch::kDouble).contiguous(), n = natoms.to(torch::kDouble).contiguous();
  const bool forces = F.has_value() && F->defined();
  const double aE = forces ? 1.0 - alpha : 1.0, aF = forces ? alpha : 0.0;
  auto gE = torch::empty({B}, e.options());
  double lossE = 0.0;
  {
    const double *pe = e.data_ptr<double>(), *pr = er.data_ptr<double>(), *pw = w.data_ptr<double>(),
                 *pn = n.data_ptr<double>();
    double* pg = gE.data_ptr<double>();
    for (int64_t b = 0; b < B; ++b) {
      const double d = pe[b] - pr[b];
      const double we = per_atom ? pw[b] / (c0 * pn[b] * pn[b]) : pw[b] / c0;
      lossE += we * d * d;
      pg[b] = 2.0 * aE * we * d;
    }
  }
  double lossF = 0.0;
  torch::Tensor gF;
  if (forces) {
    TORCH_CHECK(F_ref.has_value() && structure.has_value() && mask.has_value(),
                "energy_force_loss: F needs F_ref, structure and mask");
    const int64_t N = F->size(0);
    TORCH_CHECK(F->dim() == 2 && F->size(1) == 3 && F_ref->sizes() == F->sizes() && structure->numel() == N &&
                    mask->numel() == N,
                "energy_force_loss: F and F_ref [N, 3], structure and mask [N]");
    const auto f = F->to(torch::kDouble).contiguous(), fr = F_ref->to(torch::kDouble).contiguous();
    const auto st = structure->to(torch::kLong).contiguous();
    const auto mk = mask->to(torch::kBool).contiguous();
    gF = torch::zeros({N, 3}, f.options());
    if (c1 > 0) {
      const double *pf = f.data_ptr<double>(), *pr = fr.data_ptr<double>(), *pw = w.data_ptr<double>();
      const int64_t* ps = st.data_ptr<int64_t>();
      const bool* pm = mk.data_ptr<bool>();
      double* pg = gF.data_ptr<double>();
      for (int64_t i = 0; i < N; ++i) {
        if (!pm[i]) continue;
        TORCH_CHECK(ps[i] >= 0 && ps[i] < B, "energy_force_loss: structure index out of range");
        const double wi = pw[ps[i]] / c1;
        for (int c = 0; c < 3; ++c) {
          const double d = pf[3 * i + c] - pr[3 * i + c];
          lossF += wi * d * d;
          pg[3 * i + c] = 2.0 * aF * wi * d;
        }
      }
    }
    gF = gF.to(F->scalar_type());
  }
  auto loss = torch::full({}, aE * lossE + aF * lossF, e.options());
  return {loss, gE.to(E.scalar_type()), forces ? gF : torch::zeros({0}, e.options())};
}

}  // namespace
}  // namespace distmlip

TORCH_LIBRARY_FRAGMENT(distmlip, m) {
  m.def(
      "bpnn_energy_forces(Tensor positions, Tensor species, Tensor pair_ptr, Tensor pair_j, "
      "Tensor pair_shift, Tensor typespin, float rc_radial, int n_radial, float rc_angular, "
      "int n_angular, Tensor mean, Tensor inv_std, Tensor base, Tensor scale, Tensor structure, "
      "int n_structures, Tensor[] params, int[] activations) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bpnn_energy_forces_virial(Tensor positions, Tensor species, Tensor pair_ptr, Tensor pair_j, "
      "Tensor pair_shift, Tensor typespin, float rc_radial, int n_radial, float rc_angular, "
      "int n_angular, Tensor mean, Tensor inv_std, Tensor base, Tensor scale, Tensor structure, "
      "int n_structures, Tensor[] params, int[] activations) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bpnn_energy_forces_backward(Tensor? Ebar, Tensor? Fbar, Tensor positions, Tensor species, "
      "Tensor pair_ptr, Tensor pair_j, Tensor pair_shift, Tensor typespin, float rc_radial, "
      "int n_radial, float rc_angular, int n_angular, Tensor x, Tensor g, Tensor moments, Tensor nets_saved, "
      "Tensor inv_std, Tensor scale, Tensor structure, Tensor[] params, int[] activations, "
      "bool need_params, bool need_positions, bool flat_params, Tensor? Wbar=None) -> Tensor[]");
  m.def(
      "energy_force_loss(Tensor E, Tensor E_ref, Tensor weight, Tensor natoms, bool per_atom, Tensor? F, "
      "Tensor? F_ref, Tensor? structure, Tensor? mask, Tensor counts, float alpha) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(distmlip, CPU, m) {
  m.impl("bpnn_energy_forces", &distmlip::energy_forces_cpu);
  m.impl("bpnn_energy_forces_virial", &distmlip::energy_forces_virial_cpu);
  m.impl("bpnn_energy_forces_backward", &distmlip::energy_forces_backward_cpu);
  m.impl("energy_force_loss", &distmlip::energy_force_loss_cpu);
}
