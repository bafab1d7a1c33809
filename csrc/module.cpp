// Makes `import resnet_fused._C` load this shared library, whose static initialisers
// register the resnet_fused_C operators with the dispatcher. There are no pybind
// functions: everything is reached through torch.ops.resnet_fused_C.*.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "resnet_fused compiled operators", -1, nullptr};
  return PyModule_Create(&def);
}
}
