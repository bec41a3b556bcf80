// dspark/pdl.cuh: programmatic dependent launch (Hopper+ code on a Hopper+ GPU) for the decode
// kernels; elsewhere the same kernels launch in plain stream order.
//
// A decode step is a chain of short kernels (4 fused linears + attention per layer); between two
// of them the GPU otherwise idles for the launch and the ramp-up of the next grid. Launched with
// programmatic stream serialization (also inside CUDA graphs), a kernel may start while its
// predecessor drains. Contract for every kernel launched this way:
//   - pdl_trigger() early: lets the successor launch as our blocks retire;
//   - before any global write, and before reading anything an earlier kernel wrote, pdl_wait()
//     (returns once the predecessor grid has completed and its writes are visible; stream-
//     ordered memory reuse makes even a fresh output buffer unsafe to write before it);
//   - only constant data (weights) may be read before pdl_wait().
// Completion of a kernel implies its own pdl_wait() returned, so ordering is transitive.
#pragma once
#include <cuda_runtime.h>

namespace dspark {
namespace cuda {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// kernel<<<grid, block, smem, stream>>>(args...) in thread-block clusters of `cluster_x` blocks
// along x (Hopper+; grid.x must be a multiple of it; 0: no cluster attribute), with
// programmatic stream serialization allowed when `programmatic`, else an ordinary stream-ordered
// launch: then the kernel's pdl_wait() returns at once (its predecessor is complete before it
// starts), while its pdl_trigger() still lets a programmatic successor launch early.
// `programmatic` only where the kernel's code was compiled for sm_90 (its pdl_wait() is real):
// a compute_80 build JIT-compiled on Hopper has none (sm90_paths below).
template <typename... KArgs, typename... Args>
cudaError_t launch_pdl_cluster(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                               cudaStream_t stream, bool programmatic, unsigned cluster_x,
                               Args... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  unsigned n = 0;
  if (programmatic) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster_x) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = cluster_x;
    attr[n].val.clusterDim.y = 1;
    attr[n++].val.clusterDim.z = 1;
  }
  cfg.attrs = attr;
  cfg.numAttrs = n;
  return cudaLaunchKernelEx(&cfg, kernel, args...);
}

// Whether the sm_90 paths (programmatic launch, thread-block clusters) are usable for `kernel` on
// the current device: a Hopper+ device running sm_90 code of it. A compute_80 build JIT-compiled
// on Hopper has no griddepcontrol.wait and no cluster barriers (pdl_wait above and
// linear_kernel.cuh's cluster_wait compile them out), so an early start or a cluster would race
// there. All kernels of a build share the architectures; cached per device and kernel signature.
template <typename... KArgs>
cudaError_t sm90_paths(void (*kernel)(KArgs...), bool* out) {
  constexpr int kMaxDevices = 64;
  static signed char usable[kMaxDevices] = {};  // 0 unknown, 1 no, 2 yes
  *out = false;
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev < 0 || dev >= kMaxDevices) return cudaErrorInvalidDevice;
  if (!usable[dev]) {
    int major = 0;
    cudaFuncAttributes a{};
    if ((err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev)) ||
        (err = cudaFuncGetAttributes(&a, kernel)))
      return err;
    usable[dev] = major >= 9 && a.ptxVersion >= 90 ? 2 : 1;
  }
  *out = usable[dev] == 2;
  return cudaSuccess;
}

template <typename... KArgs, typename... Args>
cudaError_t launch_ex(bool programmatic, void (*kernel)(KArgs...), dim3 grid, dim3 block,
                      size_t smem, cudaStream_t stream, Args... args) {
  return launch_pdl_cluster(kernel, grid, block, smem, stream, programmatic, 0u, args...);
}

}  // namespace cuda
}  // namespace dspark
