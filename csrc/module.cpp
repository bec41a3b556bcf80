// csrc/module.cpp: the Python module `dspark._C`, in pybind11. Importing it runs the static
// TORCH_LIBRARY registrations of the ops (they are torch.ops.dspark.*, custom ops, not pybind11
// functions); the functions here say what this build contains and what it runs as here.
#include <pybind11/pybind11.h>
#include <torch/version.h>

#include <string>

#ifdef DSPARK_WITH_CUDA
#include <cuda_runtime_api.h>

#include "cuda/launch.h"
#endif

namespace py = pybind11;

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

// What the binary was compiled with (the headers and toolkit, not what is installed now).
py::dict build_facts() {
  py::dict d;
  d["torch_version"] = std::string(TORCH_VERSION);
  d["with_cuda"] = kWithCuda;
  d["cxx11_abi"] = bool(_GLIBCXX_USE_CXX11_ABI);
#ifdef DSPARK_WITH_CUDA
  d["cuda_archs"] = std::string(DSPARK_CUDA_ARCHS_TEXT);
  d["cuda_runtime"] =
      std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
#else
  d["cuda_archs"] = py::none();
  d["cuda_runtime"] = py::none();
#endif
  return d;
}

#ifdef DSPARK_WITH_CUDA
void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}
#endif

// One visible GPU: its properties and the code the kernels run as on it. kernel_ptx_arch is
// the architecture the kernels were compiled for (80 for a compute_80 build, even when the
// driver JIT-compiles it for a Hopper GPU); sm90_paths: clusters and programmatic launch in use.
py::dict device_properties(int index) {
#ifdef DSPARK_WITH_CUDA
  int count = 0;
  check(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  if (index < 0 || index >= count)
    throw py::value_error("device index " + std::to_string(index) + " is not in [0, " +
                          std::to_string(count) + ")");
  cudaDeviceProp p{};
  check(cudaGetDeviceProperties(&p, index), "cudaGetDeviceProperties");
  int before = 0, ptx = 0, binary = 0;
  check(cudaGetDevice(&before), "cudaGetDevice");
  check(cudaSetDevice(index), "cudaSetDevice");
  const cudaError_t err = dspark::linear_kernel_arch(&ptx, &binary);
  check(cudaSetDevice(before), "cudaSetDevice");
  check(err, "cudaFuncGetAttributes");
  py::dict d;
  d["name"] = std::string(p.name);
  d["capability"] = py::make_tuple(p.major, p.minor);
  d["multiprocessors"] = p.multiProcessorCount;
  d["total_memory"] = p.totalGlobalMem;
  d["kernel_ptx_arch"] = ptx;
  d["kernel_binary_arch"] = binary;
  d["sm90_paths"] = p.major >= 9 && ptx >= 90;
  return d;
#else
  throw py::value_error("this dspark build has no CUDA kernels");
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dspark native module: build facts; the ops are torch.ops.dspark.*";
  m.def("cuda_enabled", [] { return kWithCuda; }, "True if this build has the CUDA kernels.");
  m.def(
      "set_sync_checks",
      [](bool enabled) {
        const bool before = dspark::cuda_sync_checks();
        dspark::cuda_sync_checks() = enabled;
        return before;
      },
      py::arg("enabled"),
      "Enable/disable reading CUDA data-check results back after each op (returns the old "
      "value).");
  m.def(
      "set_verify_impl",
      [](const std::string& name) {
        // Internal A/B switch of the CUDA verify / sample implementation: "fused" (default: one
        // kernel) or "staged" (the five-kernel pipeline it replaced). Returns the previous name.
        if (name != "fused" && name != "staged")
          throw py::value_error("verify impl must be 'fused' or 'staged'");
        const int before = dspark::cuda_verify_impl();
        dspark::cuda_verify_impl() = name == "staged" ? 1 : 0;
        return std::string(before == 1 ? "staged" : "fused");
      },
      py::arg("name"),
      "Internal: CUDA verify/sample implementation, 'fused' or 'staged' (returns the old one).");
  m.def("build_facts", &build_facts, "What the binary was compiled with.");
  m.def("device_properties", &device_properties, py::arg("index") = 0,
        "A visible GPU's properties and the architecture the kernels run as on it.");
}
