// The Python module rollingq_kernels._C. Loading the shared library runs the
// static TORCH_LIBRARY registrations of ops.cpp, which is what
// `import rollingq_kernels._C` is for (no pybind11, no torch/extension.h).
// The module itself only reports and sets the instruction set of the float
// row kernels (cpu_capability.h):
//
//   cpu_capability() -> str                       "default", "avx2" or "avx512": the level in use
//   supported_cpu_capabilities() -> tuple[str]    the levels this build and CPU can run, lowest first
//   _set_cpu_capability(name: str) -> str         use `name` from now on (tests); returns the previous
//   _row_ops_level() -> str                       the level the dispatched table was compiled for, in
//                                                 cpu_capability()'s spelling (tests: equal to it)
//   _bf16_kernels() -> bool                       bfloat16 inputs get the AVX512_BF16 GEMMs at this level
//   _tile_gemm_seconds(tiles, rows, keys, head_dim, reps) -> float
//                                                 the GEMM-rate probe of the benchmarks (gemm_probe.h)
//   MARCH_NATIVE: bool                            built with -march=native (ROLLINGQ_NATIVE=1)
//
// It uses CPython's limited API only (Py_LIMITED_API, defined by the build for
// py_limited_api=True): one _C.abi3.so serves every CPython from 3.10 on.
#include <Python.h>

#include <cctype>
#include <exception>
#include <string>

#include "cpu_capability.h"
#include "float_row_ops.h"
#include "gemm_probe.h"

#ifndef ROLLINGQ_MARCH_NATIVE
#define ROLLINGQ_MARCH_NATIVE 0
#endif

namespace {

PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(rollingq::capability_name(rollingq::cpu_capability()));
}

PyObject* supported_cpu_capabilities(PyObject*, PyObject*) {
  const auto levels = rollingq::supported_capabilities();
  PyObject* names = PyTuple_New(static_cast<Py_ssize_t>(levels.size()));
  if (names == nullptr) return nullptr;
  for (size_t i = 0; i < levels.size(); ++i)
    if (PyTuple_SetItem(names, static_cast<Py_ssize_t>(i),
                        PyUnicode_FromString(rollingq::capability_name(levels[i]))) < 0) {
      Py_DECREF(names);
      return nullptr;
    }
  return names;
}

PyObject* set_cpu_capability(PyObject*, PyObject* arg) {
  if (!PyUnicode_Check(arg)) {  // the type's name through __name__: PyTypeObject is opaque in the limited API
    PyObject* type_name = PyObject_GetAttrString(reinterpret_cast<PyObject*>(Py_TYPE(arg)), "__name__");
    if (type_name == nullptr) return nullptr;
    PyErr_Format(PyExc_TypeError, "name: expected a str, got %U", type_name);
    Py_DECREF(type_name);
    return nullptr;
  }
  const char* name = PyUnicode_AsUTF8AndSize(arg, nullptr);
  if (name == nullptr) return nullptr;
  rollingq::CpuCapability level;
  if (!rollingq::parse_capability(name, &level)) {
    PyErr_Format(PyExc_ValueError, "name: expected 'default', 'avx2' or 'avx512', got '%s'", name);
    return nullptr;
  }
  std::string supported;
  bool runs = false;
  for (rollingq::CpuCapability c : rollingq::supported_capabilities()) {
    supported += std::string(supported.empty() ? "" : ", ") + rollingq::capability_name(c);
    runs = runs || c == level;
  }
  if (!runs) {
    PyErr_Format(PyExc_ValueError, "name: this build and CPU cannot run '%s' kernels (supported: %s)", name,
                 supported.c_str());
    return nullptr;
  }
  return PyUnicode_FromString(rollingq::capability_name(rollingq::set_cpu_capability(level)));
}

PyObject* row_ops_level(PyObject*, PyObject*) {
  std::string level = rollingq::float_row_ops().level;  // "AVX2": the unit's CPU_CAPABILITY
  for (char& ch : level) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return PyUnicode_FromString(level.c_str());
}

PyObject* bf16_kernels(PyObject*, PyObject*) { return PyBool_FromLong(rollingq::float_row_ops().gemm_nt_bf16 != nullptr); }

PyObject* tile_gemm_seconds(PyObject*, PyObject* args) {
  long long tiles, rows, keys, head_dim, reps;
  if (!PyArg_ParseTuple(args, "LLLLL", &tiles, &rows, &keys, &head_dim, &reps)) return nullptr;
  if (tiles < 1 || rows < 1 || keys < 1 || head_dim < 1 || reps < 1) {
    PyErr_Format(PyExc_ValueError, "tiles, rows, keys, head_dim, reps: expected positive ints, got %lld, %lld, "
                 "%lld, %lld, %lld", tiles, rows, keys, head_dim, reps);
    return nullptr;
  }
  PyThreadState* released = PyEval_SaveThread();  // the GIL is not needed while it runs
  double seconds = 0.0;
  std::string error;  // a C++ exception must not unwind through CPython's frames: raised below instead
  try {
    seconds = rollingq::tile_gemm_seconds(tiles, rows, keys, head_dim, reps);
  } catch (const std::exception& exc) {
    error = exc.what();
  }
  PyEval_RestoreThread(released);
  if (!error.empty()) {
    PyErr_SetString(PyExc_RuntimeError, error.c_str());
    return nullptr;
  }
  return PyFloat_FromDouble(seconds);
}

PyMethodDef methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS, "The instruction set of the float row kernels in use."},
    {"supported_cpu_capabilities", supported_cpu_capabilities, METH_NOARGS,
     "The instruction sets this build and CPU can run, lowest first."},
    {"_set_cpu_capability", set_cpu_capability, METH_O,
     "Use the given instruction set from now on (for tests); returns the previous one."},
    {"_row_ops_level", row_ops_level, METH_NOARGS,
     "The instruction set the dispatched float row kernels were compiled for (for tests)."},
    {"_bf16_kernels", bf16_kernels, METH_NOARGS,
     "Whether bfloat16 inputs get the AVX512_BF16 tile GEMMs at the level in use (else they are upcast)."},
    {"_tile_gemm_seconds", tile_gemm_seconds, METH_VARARGS,
     "Fastest seconds of the kernels' own tile GEMMs (S = Q K^T, O += S V) over independent tiles (benchmarks)."},
    {nullptr, nullptr, 0, nullptr},
};

struct PyModuleDef rollingq_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "rollingq CPU kernels: importing registers torch.ops.rollingq.attention_fwd / attention_bwd.",
    -1,
    methods,
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&rollingq_module);
  if (module != nullptr && PyModule_AddObject(module, "MARCH_NATIVE", PyBool_FromLong(ROLLINGQ_MARCH_NATIVE)) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
