// nitrokernels._C: the Python module itself only reports how it was built. Each kernel family under
// csrc/<family>/ registers its ops into the `nitrokernels_cuda` torch.library namespace with
// TORCH_LIBRARY_FRAGMENT, so importing this module makes torch.ops.nitrokernels_cuda.* available.
#include <torch/extension.h>

#ifndef CUDA_VERSION
#include <cuda.h>
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["cuda_version"] = CUDA_VERSION;  // e.g. 13000 for CUDA 13.0
  info["torch_version"] = TORCH_VERSION;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "nitrokernels CUDA kernels (ops live in torch.ops.nitrokernels_cuda)";
  m.def("build_info", &build_info, "CUDA and torch versions this extension was compiled with");
}
