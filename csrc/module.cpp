// Python module entry for iaerf._C. The fused ops' kernels are registered with the dispatcher
// (TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda; their schemas are defined by the op files, iaerf/ops/*.py);
// importing the module runs those static registrations, so no Python bindings are needed here.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "iaerf native kernels, exposed as torch.ops.iaerf.*",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

// Lets Python ask whether the CUDA kernels were compiled in (torch.ops.iaerf.built_with_cuda()): an internal op
// describing the build, defined here rather than in Python.
#include <torch/library.h>

static bool built_with_cuda() {
#ifdef IAERF_WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY_FRAGMENT(iaerf, m) {
  m.def("built_with_cuda() -> bool", &built_with_cuda);
}
