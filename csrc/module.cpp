// Python module entry of the compiled extension distmlip._C and the operator library
// "distmlip".  Kernels in other files register themselves with TORCH_LIBRARY_FRAGMENT /
// TORCH_LIBRARY_IMPL; this file defines the (otherwise empty) library.
#include <torch/extension.h>

TORCH_LIBRARY(distmlip, m) {}

bool with_cuda() {
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
