// csrc/module.cpp: the Python module `dspark._C`. Importing it runs the static op registrations;
// it also answers what this build contains. Plain CPython API: nothing here needs pybind11.
#include <Python.h>

#include <string>

namespace dspark {
bool& cuda_sync_checks();  // csrc/checks.cpp
int& cuda_verify_impl();   // csrc/checks.cpp
}  // namespace dspark

namespace {

#ifdef DSPARK_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

PyObject* cuda_enabled(PyObject*, PyObject*) { return PyBool_FromLong(kWithCuda); }

PyObject* set_sync_checks(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  const bool before = dspark::cuda_sync_checks();
  dspark::cuda_sync_checks() = on != 0;
  return PyBool_FromLong(before);
}

// Internal A/B switch of the CUDA verify / sample implementation: "fused" (default) or
// "staged" (the kernels the fused one replaces). Returns the previous name.
PyObject* set_verify_impl(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  const std::string want(name);
  if (want != "fused" && want != "staged") {
    PyErr_SetString(PyExc_ValueError, "verify impl must be 'fused' or 'staged'");
    return nullptr;
  }
  const int before = dspark::cuda_verify_impl();
  dspark::cuda_verify_impl() = want == "staged" ? 1 : 0;
  return PyUnicode_FromString(before == 1 ? "staged" : "fused");
}

PyMethodDef kMethods[] = {
    {"cuda_enabled", cuda_enabled, METH_NOARGS, "True if this build has the CUDA kernels."},
    {"set_sync_checks", set_sync_checks, METH_O,
     "Enable/disable reading CUDA data-check results back after each op (returns the old value)."},
    {"set_verify_impl", set_verify_impl, METH_O,
     "Internal: CUDA verify/sample implementation, 'fused' or 'staged' (returns the old one)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", "dspark native ops (torch.ops.dspark)", -1,
                       kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&kModule); }
