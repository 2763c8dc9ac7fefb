// The Python module rollingq_kernels._C: empty on purpose. Loading the shared
// library runs the static TORCH_LIBRARY registrations of ops.cpp, which is all
// `import rollingq_kernels._C` needs to do (no pybind11, no torch/extension.h).
#include <Python.h>

static struct PyModuleDef rollingq_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "rollingq CPU kernels: importing registers torch.ops.rollingq.attention_fwd / attention_bwd.",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&rollingq_module); }
