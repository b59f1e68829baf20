// The compiled extension `grasp._C`.
//
// Operators are registered with TORCH_LIBRARY / TORCH_LIBRARY_IMPL when this
// shared object is loaded; Python reaches them through torch.ops.grasp.*.
// The module itself is empty (the extension-cpp convention: no pybind), and
// is built against the limited C API so one wheel serves several Pythons.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",    /* name of module */
      nullptr, /* no docstring */
      -1,      /* no per-interpreter state */
      nullptr, /* no methods */
  };
  return PyModule_Create(&module_def);
}
}
