// The importable module fusedopt._cuda. Like fusedopt._C it has no Python functions: importing it runs the
// TORCH_LIBRARY_IMPL(fusedopt, CUDA, ...) registration in cuda_ops.cpp, after which torch.ops.fusedopt.*
// dispatch CUDA tensors to the kernels here. It needs only the limited Python API.
#include <Python.h>

extern "C" {
PyObject* PyInit__cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
