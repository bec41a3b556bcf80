// csrc/module.cpp: the Python module `dspark._C`. Importing it runs the static op registrations;
// it also answers what this build contains. Plain CPython API: nothing here needs pybind11.
#include <Python.h>

namespace {

#ifdef DSPARK_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

PyObject* cuda_enabled(PyObject*, PyObject*) { return PyBool_FromLong(kWithCuda); }

PyMethodDef kMethods[] = {
    {"cuda_enabled", cuda_enabled, METH_NOARGS, "True if this build has the CUDA kernels."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", "dspark native ops (torch.ops.dspark)", -1,
                       kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&kModule); }
