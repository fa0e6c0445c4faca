// CPU operator implementations shared between translation units: the combined energy-and-forces
// operator of a Behler-Parrinello potential (bpnn_forces_cpu.cpp) calls the descriptor kernels
// (chebyshev_cpu.cpp) and the per-species networks (nets_cpu.cpp) directly, without going
// through the dispatcher or Python.
#pragma once

#include <torch/extension.h>

#include <functional>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

namespace distmlip {

// shape, dtype, device and order checks of the descriptor operators' inputs (not the O(P) values)
void chebyshev_check_inputs(const torch::Tensor& positions, const torch::Tensor& species,
                            const torch::Tensor& pair_ptr, const torch::Tensor& pair_j,
                            const torch::Tensor& pair_shift, const torch::Tensor& typespin, double rc_r,
                            int64_t n_r, double rc_a, int64_t n_a);

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

// The same with a strain tangent [B, 3, 3] per structure (structure [N]) added to the position
// tangent v: J (v + strain), the JVP of the weight gradient of a stress loss (JVP only).
std::tuple<torch::Tensor, torch::Tensor> chebyshev_double_backward_strain_cpu(
    const torch::Tensor& grad_G, const torch::Tensor& v, const torch::Tensor& positions,
    const torch::Tensor& species, const torch::Tensor& pair_ptr, const torch::Tensor& pair_j,
    const torch::Tensor& pair_shift, const torch::Tensor& typespin, double rc_r, int64_t n_r,
    double rc_a, int64_t n_a, bool need_jvp, bool need_hvp,
    const std::optional<torch::Tensor>& moments, const std::optional<torch::Tensor>& strain,
    const std::optional<torch::Tensor>& structure);

// The forward and the VJP of the descriptor in one pass over the centres (float64 positions; the
// force operator): returns (G [N, D], moments (as chebyshev_forward_moments), g [N, D],
// J^T g [N, 3]), where the rows g_i = dE/dG_i are written by rows(c0, c1, G, g) for the centres
// c0 .. c1 - 1 from their rows of G as soon as those are complete (small blocks; called
// concurrently for disjoint blocks when several threads run).  Each centre's pair pass is done
// once for both.  Results are bitwise those of chebyshev_forward_moments_cpu followed by
// chebyshev_backward_cpu with the moments.  virial (optional): set to [N, 9] float64, per centre
// sum over its pairs of r_p (x) dE/d r_p (the per-structure sums are the virial dE/d(strain)).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> chebyshev_forward_vjp_cpu(
    const torch::Tensor& positions, const torch::Tensor& species, const torch::Tensor& pair_ptr,
    const torch::Tensor& pair_j, const torch::Tensor& pair_shift, const torch::Tensor& typespin,
    double rc_r, int64_t n_r, double rc_a, int64_t n_a,
    const std::function<void(int64_t, int64_t, const double*, double*)>& rows,
    torch::Tensor* virial = nullptr);

// The per-species networks of bpnn_nets_forward_cpu evaluated block of atoms by block, with the
// parameters packed once (float64 parameters; for the pipelined force operator).
class NetsForward {
 public:
  NetsForward(const std::vector<torch::Tensor>& params, const std::vector<int64_t>& activations, int64_t D);
  ~NetsForward();
  int64_t n_species() const;
  int64_t save_row() const;  // doubles per atom of the saved intermediates
  // Atoms a0 .. a0 + nb - 1 of x [N, D] (species sp [N], in range): their entries of y [N],
  // dydx [N, D] and save [N, save_row] (the `saved` tensor of bpnn_nets_forward_cpu).  Safe to
  // call concurrently for disjoint blocks.  Same values as bpnn_nets_forward_cpu (bitwise with tanh
  // and linear layers; torch's vectorised kernels for the other activations may differ in the last
  // bit with the block length).
  void run(const double* x, const int64_t* sp, int64_t a0, int64_t nb, double* y, double* dydx,
           double* save) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

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
