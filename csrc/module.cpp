// The Python module moce_kernels._C. Importing it registers the ops (TORCH_LIBRARY in the other
// sources) with the dispatcher; the module itself only says what was compiled in.
#include <torch/extension.h>

namespace {

bool built_with_cuda() {
#ifdef MOCE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moce_kernels._C: C++ CPU kernels (and CUDA kernels when built with them) of the moce ops";
  m.def("built_with_cuda", &built_with_cuda, "Whether the CUDA kernels were compiled into this module.");
}
