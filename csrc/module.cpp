// Python module entry of the compiled extension distmlip._C and the operator library
// "distmlip".  Kernels in other files register themselves with TORCH_LIBRARY_FRAGMENT /
// TORCH_LIBRARY_IMPL; this file defines the library and one small utility op.
#include <torch/extension.h>

#include <vector>

namespace distmlip {

// Sum of per-row values into segments (e.g. atomic energies into structure energies),
// accumulated in float64 whatever the input precision.
torch::Tensor segment_sum_cpu(const torch::Tensor& values, const torch::Tensor& segment,
                              int64_t num_segments) {
  TORCH_CHECK(values.dim() == 1, "segment_sum: values must be 1-D");
  TORCH_CHECK(segment.dim() == 1 && segment.size(0) == values.size(0),
              "segment_sum: segment must be 1-D with one entry per value");
  auto v = values.to(torch::kDouble).contiguous();
  auto s = segment.to(torch::kLong).contiguous();
  auto out = torch::zeros({num_segments}, v.options());
  const double* pv = v.data_ptr<double>();
  const int64_t* ps = s.data_ptr<int64_t>();
  double* po = out.data_ptr<double>();
  const int64_t n = v.size(0);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(ps[i] >= 0 && ps[i] < num_segments, "segment_sum: segment index out of range");
    po[ps[i]] += pv[i];
  }
  return out;
}

}  // namespace distmlip

TORCH_LIBRARY(distmlip, m) {
  m.def("segment_sum(Tensor values, Tensor segment, int num_segments) -> Tensor");
}

TORCH_LIBRARY_IMPL(distmlip, CPU, m) { m.impl("segment_sum", &distmlip::segment_sum_cpu); }

static bool with_cuda() {
#ifdef DISTMLIP_WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "distmlip compiled kernels (operators are in torch.ops.distmlip)";
  m.def("with_cuda", &with_cuda, "whether the CUDA kernels were compiled in");
}
