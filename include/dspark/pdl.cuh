// dspark/pdl.cuh: programmatic dependent launch (Hopper+) for the decode kernels.
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

// kernel<<<grid, block, smem, stream>>>(args...), with programmatic stream serialization
// allowed when `programmatic` (launch_pdl) or as an ordinary stream-ordered launch: then the
// kernel's pdl_wait() returns at once (its predecessor is complete before it starts), while
// its pdl_trigger() still lets a programmatic successor launch early.
template <typename... KArgs, typename... Args>
cudaError_t launch_ex(bool programmatic, void (*kernel)(KArgs...), dim3 grid, dim3 block,
                      size_t smem, cudaStream_t stream, Args... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = programmatic ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, args...);
}

template <typename... KArgs, typename... Args>
cudaError_t launch_pdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                       cudaStream_t stream, Args... args) {
  return launch_ex(true, kernel, grid, block, smem, stream, args...);
}

// launch_pdl in thread-block clusters of `cluster_x` blocks along x (Hopper+; grid.x must be a
// multiple of it). cluster_x == 0: no cluster attribute (devices before Hopper).
template <typename... KArgs, typename... Args>
cudaError_t launch_pdl_cluster(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                               cudaStream_t stream, unsigned cluster_x, Args... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  attr[1].id = cudaLaunchAttributeClusterDimension;
  attr[1].val.clusterDim.x = cluster_x;
  attr[1].val.clusterDim.y = 1;
  attr[1].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = cluster_x ? 2 : 1;
  return cudaLaunchKernelEx(&cfg, kernel, args...);
}

}  // namespace cuda
}  // namespace dspark
