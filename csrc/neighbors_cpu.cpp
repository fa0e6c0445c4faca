// Neighbour pairs of one structure, written directly in the canonical order of
// distmlip/descriptors/neighbors.py (by centre i, then neighbour j, then the image shift S in
// lexicographic order), so that no sort follows.  Why: a cell-list library plus the sort took
// 0.3-3 ms per structure of 32-256 atoms in Python, more than a force step on it, and training
// sets beyond data.neighbor_cache_mb rebuild their lists every epoch; here the same lists cost a
// few tens of microseconds for DFT-sized cells.
//
// Method: for every pair (i, j) only the images whose fractional offset along each periodic axis
// k lies within cutoff / h_k (h_k the lattice-plane spacing) can be closer than the cutoff, i.e.
// S_k in (f_i - f_j - reach_k, f_i - f_j + reach_k); those are tried in lexicographic order and
// kept when |r_j + S.cell - r_i| < cutoff.  O(n^2 x images): the Python wrapper sends only
// structures whose candidate count is small enough (large cells keep the cell list).
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <tuple>
#include <vector>

namespace distmlip {
namespace {

// The candidate search shared by the operators below: calls visit(i, j, S0, S1, S2, d2) for every
// pair (i, j, image S) closer than the cutoff, in the canonical order.
// positions [n, 3] float64; full [3, 3] float64, rows the cell vectors with every non-periodic
// row completed (invertible: the caller completes it); cell [3, 3] float64, the rows that image
// shifts multiply (the structure's own cell; its non-periodic rows are never used);
// pbc: three 0/1 flags.
template <typename Visit>
void for_each_pair(const torch::Tensor& positions, const torch::Tensor& full, const torch::Tensor& cell,
                   const std::vector<int64_t>& pbc, double cutoff, Visit&& visit) {
  TORCH_CHECK(positions.dim() == 2 && positions.size(1) == 3, "neighbor_pairs: positions must be [n, 3]");
  TORCH_CHECK(full.dim() == 2 && full.size(0) == 3 && full.size(1) == 3, "neighbor_pairs: full must be [3, 3]");
  TORCH_CHECK(cell.dim() == 2 && cell.size(0) == 3 && cell.size(1) == 3, "neighbor_pairs: cell must be [3, 3]");
  TORCH_CHECK(pbc.size() == 3, "neighbor_pairs: pbc must have three flags");
  TORCH_CHECK(positions.scalar_type() == torch::kFloat64 && full.scalar_type() == torch::kFloat64 &&
                  cell.scalar_type() == torch::kFloat64,
              "neighbor_pairs: float64 inputs expected");
  TORCH_CHECK(std::isfinite(cutoff) && cutoff > 0.0, "neighbor_pairs: cutoff must be positive and finite");
  const auto pos_c = positions.contiguous();
  const auto full_c = full.contiguous();
  const auto cell_c = cell.contiguous();
  const int64_t n = pos_c.size(0);
  const double* r = pos_c.data_ptr<double>();
  const double* A = full_c.data_ptr<double>();
  const double* C = cell_c.data_ptr<double>();
  const bool per[3] = {pbc[0] != 0, pbc[1] != 0, pbc[2] != 0};

  // inverse of the full cell (rows = vectors): frac = r . inv, column k of inv has norm 1 / h_k
  double inv[9];
  {
    const double det = A[0] * (A[4] * A[8] - A[5] * A[7]) - A[1] * (A[3] * A[8] - A[5] * A[6]) +
                       A[2] * (A[3] * A[7] - A[4] * A[6]);
    TORCH_CHECK(std::isfinite(det) && det != 0.0, "neighbor_pairs: singular cell");
    inv[0] = (A[4] * A[8] - A[5] * A[7]) / det;
    inv[1] = (A[2] * A[7] - A[1] * A[8]) / det;
    inv[2] = (A[1] * A[5] - A[2] * A[4]) / det;
    inv[3] = (A[5] * A[6] - A[3] * A[8]) / det;
    inv[4] = (A[0] * A[8] - A[2] * A[6]) / det;
    inv[5] = (A[2] * A[3] - A[0] * A[5]) / det;
    inv[6] = (A[3] * A[7] - A[4] * A[6]) / det;
    inv[7] = (A[1] * A[6] - A[0] * A[7]) / det;
    inv[8] = (A[0] * A[4] - A[1] * A[3]) / det;
  }
  double reach[3];
  int64_t count[3];
  for (int k = 0; k < 3; ++k) {
    const double h_inv = std::sqrt(inv[k] * inv[k] + inv[3 + k] * inv[3 + k] + inv[6 + k] * inv[6 + k]);
    reach[k] = cutoff * h_inv;
    count[k] = per[k] ? static_cast<int64_t>(std::floor(2.0 * reach[k])) + 1 : 1;
  }
  std::vector<double> frac(3 * n);
  for (int64_t a = 0; a < n; ++a)
    for (int k = 0; k < 3; ++k)
      frac[3 * a + k] = r[3 * a] * inv[k] + r[3 * a + 1] * inv[3 + k] + r[3 * a + 2] * inv[6 + k];

  const double rc2 = cutoff * cutoff;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      const double dx = r[3 * j] - r[3 * i], dy = r[3 * j + 1] - r[3 * i + 1], dz = r[3 * j + 2] - r[3 * i + 2];
      int64_t lo[3];
      for (int k = 0; k < 3; ++k)
        lo[k] = per[k] ? static_cast<int64_t>(std::ceil(frac[3 * i + k] - frac[3 * j + k] - reach[k])) : 0;
      for (int64_t a = 0; a < count[0]; ++a) {
        const double s0 = static_cast<double>(lo[0] + a);
        for (int64_t b = 0; b < count[1]; ++b) {
          const double s1 = static_cast<double>(lo[1] + b);
          for (int64_t c = 0; c < count[2]; ++c) {
            const double s2 = static_cast<double>(lo[2] + c);
            if (i == j && s0 == 0.0 && s1 == 0.0 && s2 == 0.0) continue;
            // written as the dense numpy path writes it: diff + S0 c0 + S1 c1 + S2 c2
            const double vx = dx + s0 * C[0] + s1 * C[3] + s2 * C[6];
            const double vy = dy + s0 * C[1] + s1 * C[4] + s2 * C[7];
            const double vz = dz + s0 * C[2] + s1 * C[5] + s2 * C[8];
            const double d2 = vx * vx + vy * vy + vz * vz;
            if (d2 < rc2) visit(i, j, lo[0] + a, lo[1] + b, lo[2] + c, d2);
          }
        }
      }
    }
  }
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> neighbor_pairs_cpu(
    const torch::Tensor& positions, const torch::Tensor& full, const torch::Tensor& cell,
    std::vector<int64_t> pbc, double cutoff) {
  const int64_t n = positions.size(0);
  std::vector<int64_t> out_i, out_j, out_s;
  out_i.reserve(16 * n);
  out_j.reserve(16 * n);
  out_s.reserve(48 * n);
  for_each_pair(positions, full, cell, pbc, cutoff,
                [&](int64_t i, int64_t j, int64_t s0, int64_t s1, int64_t s2, double) {
                  out_i.push_back(i);
                  out_j.push_back(j);
                  out_s.push_back(s0);
                  out_s.push_back(s1);
                  out_s.push_back(s2);
                });
  const int64_t P = static_cast<int64_t>(out_i.size());
  auto opts = torch::TensorOptions().dtype(torch::kInt64);
  auto ti = torch::empty({P}, opts), tj = torch::empty({P}, opts), ts = torch::empty({P, 3}, opts);
  std::copy(out_i.begin(), out_i.end(), ti.data_ptr<int64_t>());
  std::copy(out_j.begin(), out_j.end(), tj.data_ptr<int64_t>());
  std::copy(out_s.begin(), out_s.end(), ts.data_ptr<int64_t>());
  return {ti, tj, ts};
}

// Shortest squared distance per pair of atom types of one structure, [T, T] float64 (symmetric;
// inf where no pair is closer than the cutoff): what a training-data record needs of a
// structure, without writing its pair list (types [n] int64 in [0, T)).
torch::Tensor neighbor_type_minima_cpu(const torch::Tensor& positions, const torch::Tensor& full,
                                       const torch::Tensor& cell, std::vector<int64_t> pbc, double cutoff,
                                       const torch::Tensor& types, int64_t n_types) {
  TORCH_CHECK(types.dim() == 1 && types.size(0) == positions.size(0) && types.scalar_type() == torch::kInt64,
              "neighbor_type_minima: types must be int64 [n]");
  TORCH_CHECK(n_types > 0, "neighbor_type_minima: n_types must be positive");
  const auto t_c = types.contiguous();
  const int64_t* t = t_c.data_ptr<int64_t>();
  for (int64_t a = 0; a < t_c.size(0); ++a)
    TORCH_CHECK(t[a] >= 0 && t[a] < n_types, "neighbor_type_minima: type out of range");
  auto out = torch::full({n_types, n_types}, std::numeric_limits<double>::infinity(),
                         torch::TensorOptions().dtype(torch::kFloat64));
  double* m = out.data_ptr<double>();
  for_each_pair(positions, full, cell, pbc, cutoff,
                [&](int64_t i, int64_t j, int64_t, int64_t, int64_t, double d2) {
                  double& x = m[t[i] * n_types + t[j]];
                  if (d2 < x) x = d2;
                });
  for (int64_t a = 0; a < n_types; ++a)
    for (int64_t b = a + 1; b < n_types; ++b) {
      const double v = std::min(m[a * n_types + b], m[b * n_types + a]);
      m[a * n_types + b] = m[b * n_types + a] = v;
    }
  return out;
}

}  // namespace
}  // namespace distmlip

TORCH_LIBRARY_FRAGMENT(distmlip, m) {
  m.def("neighbor_pairs(Tensor positions, Tensor full, Tensor cell, int[] pbc, float cutoff) -> (Tensor, Tensor, Tensor)");
  m.def("neighbor_type_minima(Tensor positions, Tensor full, Tensor cell, int[] pbc, float cutoff, Tensor types, "
        "int n_types) -> Tensor");
}

TORCH_LIBRARY_IMPL(distmlip, CPU, m) {
  m.impl("neighbor_pairs", &distmlip::neighbor_pairs_cpu);
  m.impl("neighbor_type_minima", &distmlip::neighbor_type_minima_cpu);
}
